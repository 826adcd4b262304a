//! Service bindings, the node's side (`outpost_ext_dispatch::ServiceDispatch`): a call from
//! one function to another is a request of its own to the bound function, served in-process
//! as any request is (its limits, access record and usage), continuing the caller's trace.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use http::header::HeaderValue;
use http::{Request, Response};
use http_body_util::BodyExt;
use outpost_ext_dispatch::Body;

use super::NodeState;
use super::call::{
  ConnectionActivity, FunctionCall, REQUEST_ID_HEADER, call_function, outpost_error,
};
use super::hop_by_hop;
use crate::observe::access_log::{AccessRecord, RequestHead};
use crate::observe::trace_context::TraceContext;

/// The node's side of service bindings (`outpost_ext_dispatch::ServiceDispatch`): a call is a
/// request of its own to the bound function, served in-process as any request is (its
/// limits, access record and usage), continuing the caller's trace.
#[derive(Default)]
pub struct ServiceCalls {
  /// Set once the node exists (its isolates are created before it).
  pub node: std::sync::OnceLock<std::sync::Weak<NodeState>>,
}

impl outpost_ext_dispatch::ServiceDispatch for ServiceCalls {
  fn call(
    &self,
    function: &str,
    request: Request<Body>,
  ) -> futures::future::LocalBoxFuture<'static, Result<Response<Body>, String>> {
    let node = self.node.get().and_then(std::sync::Weak::upgrade);
    let function = function.to_string();
    Box::pin(async move {
      let node = node.ok_or("the node is shutting down")?;
      let (parts, body) = request.into_parts();
      let target = node
        .function_named(&function, &parts.headers)
        .ok_or_else(|| format!("no function {function:?} serves on this node"))?;
      let request_id = node.request_ids.next();
      let access = AccessRecord::new(
        node.observers.clone(),
        request_id,
        Some(RequestHead {
          method: parts.method.clone(),
          uri: parts.uri.clone(),
          host: None,
        }),
      );
      access.set_function(&target.identity);
      let mut headers = parts.headers;
      hop_by_hop::strip_request(&mut headers);
      let trace = TraceContext::from_headers(&headers);
      access.set_trace(&trace);
      let call = FunctionCall {
        function: target,
        shard: None,
        trace,
        method: parts.method,
        url: parts.uri.to_string(),
        headers,
        body: (!http_body::Body::is_end_stream(&body)).then_some(body),
        body_exceeded: Arc::new(AtomicBool::new(false)),
        access: access.clone(),
        active: Arc::new(ConnectionActivity::default()).begin(),
        cf: Vec::new(),
      };
      let (Ok(mut response) | Err(mut response)) = call_function(&node, call).await;
      if let Ok(value) = HeaderValue::from_str(request_id.as_str()) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
      }
      let status = response.status().as_u16();
      let error = outpost_error(&response).map(str::to_string);
      Ok(response.map(|body| {
        access
          .respond(status, error.as_deref(), body)
          .boxed_unsync()
      }))
    })
  }
}
