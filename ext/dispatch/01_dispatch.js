// Request and Response conversion for the outpost_dispatch extension.
//
// Requests arrive from op_dispatch_next as plain records; they become deno_fetch Request
// objects with an "immutable" header guard and a body stream backed by a Rust resource.
// Responses go back out as status, header list and either inline bytes or a stream resource.

import { core, primordials } from "ext:core/mod.js";
import {
  op_dispatch_cancelled,
  op_dispatch_fail,
  op_dispatch_next,
  op_dispatch_respond,
  op_dispatch_service,
  op_dispatch_subrequest,
} from "ext:core/ops";

const {
  ObjectDefineProperty,
  ObjectFreeze,
  ObjectPrototypeIsPrototypeOf,
  PromisePrototypeThen,
  SafeArrayIterator,
  TypeError,
  TypedArrayPrototypeGetSymbolToStringTag,
} = primordials;

const { InnerBody } = core.loadExtScript("ext:deno_fetch/22_body.js");
const { fromInnerRequest, newInnerRequest, Request, toInnerRequest } = core
  .loadExtScript("ext:deno_fetch/23_request.js");
const {
  nullBodyStatus,
  Response,
  ResponsePrototype,
  responseBodyUsed,
  toInnerResponse,
  wireHeaderList,
} = core.loadExtScript("ext:deno_fetch/23_response.js");
const {
  getReadableStreamResourceBacking,
  readableStreamForRid,
  ReadableStreamPrototype,
  resourceForReadableStream,
} = core.loadExtScript("ext:deno_web/06_streams.js");

/**
 * The request that running code works for. V8 carries it (as the async context) through
 * promise continuations, and deno_web carries it through timers, so everything a handler
 * starts, waitUntil() work included, stays attributed to its request.
 */
const currentRequest = new core.AsyncVariable();

/**
 * What is counted against one request while its handler runs (subrequests, console bytes),
 * its request id, and the trace headers its fetch() calls carry ({ traceparent, tracestate }
 * or null).
 */
function newRequestScope(id, requestId, maxSubrequests, trace) {
  return { id, requestId, subrequests: 0, maxSubrequests, trace, consoleBytes: 0 };
}

/** The scope of the request running code works for, or undefined outside any request. */
function currentScope() {
  return currentRequest.get();
}

/** Calls `fn` as work of the request `scope` belongs to; returns what it returns. */
function runForRequest(scope, fn) {
  const previous = currentRequest.enter(scope);
  try {
    return fn();
  } finally {
    core.setAsyncContext(previous);
  }
}

/**
 * Counts one subrequest (a fetch()) against the current request. Returns null when it may
 * go ahead, or the TypeError that refuses it.
 */
function claimSubrequest() {
  const scope = currentRequest.get();
  if (scope === undefined) {
    return new TypeError(
      "fetch() is only allowed while handling a request: at module top level (or in a " +
        "callback no request started) there is no request to count it against",
    );
  }
  if (scope.subrequests >= scope.maxSubrequests) {
    return new TypeError(
      `fetch() refused: this request has made ${scope.subrequests} subrequests, the ` +
        "function's limit (limits.max_subrequests)",
    );
  }
  scope.subrequests++;
  op_dispatch_subrequest(scope.id);
  return null;
}

/** Waits for the next request; resolves to null when the isolate is shutting down. */
function nextRequest() {
  return op_dispatch_next();
}

/**
 * Builds a Request from a record returned by op_dispatch_next, with `cf`: what is known of
 * the client (country, city, ..., colo = the PoP, clientIp), as in Workers.
 */
function toRequest(next) {
  const body = next.bodyRid === undefined || next.bodyRid === null
    ? null
    : new InnerBody(readableStreamForRid(next.bodyRid, true));
  const headers = next.headers;
  const inner = newInnerRequest(next.method, next.url, () => headers, body, false);
  // request.signal aborts when the request is cut short (the client went away, or a limit
  // ended it). deno_fetch asks for this only when a handler reads the signal.
  const id = next.id;
  inner.onCancel = (abort) => {
    PromisePrototypeThen(op_dispatch_cancelled(id), (cancelled) => {
      if (cancelled) abort();
    });
  };
  const request = fromInnerRequest(inner, "immutable");
  const cf = { __proto__: null };
  for (const { 0: name, 1: value } of new SafeArrayIterator(next.cf ?? [])) {
    cf[name] = name === "asn" ? Number(value) : value;
  }
  ObjectDefineProperty(request, "cf", {
    __proto__: null,
    value: ObjectFreeze(cf),
    enumerable: true,
  });
  return request;
}

/**
 * `env.NAME.fetch(input, init)` of a service binding: the request goes to the bound function
 * in-process (no socket), counted as a subrequest of the current request and carrying its
 * trace context, and its Response comes back with a streaming body.
 */
async function serviceFetch(binding, input, init) {
  const refused = claimSubrequest();
  if (refused !== null) throw refused;
  const request = new Request(input, init);
  const inner = toInnerRequest(request);
  const headers = request.headers;
  const trace = currentScope()?.trace ?? null;
  if (trace !== null && !headers.has("traceparent")) {
    headers.set("traceparent", trace.traceparent);
    if (trace.tracestate && !headers.has("tracestate")) {
      headers.set("tracestate", trace.tracestate);
    }
  }
  let bytes = null;
  let rid = null;
  if (inner.body !== null) {
    const source = inner.body.streamOrStatic;
    if (ObjectPrototypeIsPrototypeOf(ReadableStreamPrototype, source)) {
      const backing = getReadableStreamResourceBacking(source);
      rid = backing != null ? backing.rid : resourceForReadableStream(source);
    } else {
      bytes = typeof source.body === "string" ? core.encode(source.body) : source.body;
    }
  }
  const answer = await op_dispatch_service(
    binding,
    inner.method,
    inner.url(),
    inner.headerList,
    bytes,
    rid,
  );
  const body = answer.bodyRid === null || answer.bodyRid === undefined ||
      nullBodyStatus(answer.status)
    ? null
    : readableStreamForRid(answer.bodyRid, true);
  return new Response(body, { status: answer.status, headers: answer.headers });
}

/** Whether a value is a Response this runtime can send. */
function isResponse(value) {
  return value !== null && typeof value === "object" &&
    ObjectPrototypeIsPrototypeOf(ResponsePrototype, value);
}

/**
 * Takes a Response apart for sending: `[status, headerList, bytes, stream]`, where at most
 * one of `bytes` (a Uint8Array) and `stream` (a ReadableStream) is set. Throws a TypeError
 * when the response cannot be sent.
 */
function responseParts(response) {
  if (responseBodyUsed(response)) {
    throw new TypeError("the Response body was already used");
  }
  const inner = toInnerResponse(response);
  if (inner.type === "error") {
    throw new TypeError("the handler returned Response.error()");
  }
  const headers = wireHeaderList(inner);
  const body = inner.body;
  if (body === null) {
    return [inner.status, headers, null, null];
  }
  const source = body.streamOrStatic;
  if (ObjectPrototypeIsPrototypeOf(ReadableStreamPrototype, source)) {
    return [inner.status, headers, null, source];
  }
  if (source.consumed) {
    throw new TypeError("the Response body was already used");
  }
  const bytes = typeof source.body === "string"
    ? core.encode(source.body)
    : source.body;
  if (TypedArrayPrototypeGetSymbolToStringTag(bytes) !== "Uint8Array") {
    throw new TypeError("unsupported Response body type");
  }
  return [inner.status, headers, bytes, null];
}

/**
 * Sends a handler's Response for dispatch `id`. A stream body that is already backed by a
 * resource (a fetch() response) is handed over as is; any other stream gets one.
 */
function respond(id, response) {
  const { 0: status, 1: headers, 2: bytes, 3: stream } = responseParts(response);
  let rid = null;
  if (stream !== null) {
    const backing = getReadableStreamResourceBacking(stream);
    rid = backing != null && backing.autoClose
      ? backing.rid
      : resourceForReadableStream(stream);
  }
  op_dispatch_respond(id, status, headers, bytes, rid);
}

/** Reports a failed dispatch: `notAResponse` when the handler returned a non-Response. */
function fail(id, notAResponse, detail) {
  op_dispatch_fail(id, notAResponse, detail);
}

export {
  claimSubrequest,
  serviceFetch,
  currentScope,
  fail,
  isResponse,
  newRequestScope,
  nextRequest,
  respond,
  responseParts,
  runForRequest,
  toRequest,
};
