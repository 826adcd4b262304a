// Request and Response conversion for the outpost_dispatch extension.
//
// Requests arrive from op_dispatch_next as plain records; they become deno_fetch Request
// objects with an "immutable" header guard and a body stream backed by a Rust resource.
// Responses go back out as status, header list and either inline bytes or a stream resource.

import { core, primordials } from "ext:core/mod.js";
import {
  op_dispatch_fail,
  op_dispatch_next,
  op_dispatch_respond,
} from "ext:core/ops";

const {
  ObjectPrototypeIsPrototypeOf,
  TypeError,
  TypedArrayPrototypeGetSymbolToStringTag,
} = primordials;

const { InnerBody } = core.loadExtScript("ext:deno_fetch/22_body.js");
const { fromInnerRequest, newInnerRequest } = core.loadExtScript(
  "ext:deno_fetch/23_request.js",
);
const {
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

/** Waits for the next request; resolves to null when the isolate is shutting down. */
function nextRequest() {
  return op_dispatch_next();
}

/** Builds a Request from a record returned by op_dispatch_next. */
function toRequest(next) {
  const body = next.bodyRid === undefined || next.bodyRid === null
    ? null
    : new InnerBody(readableStreamForRid(next.bodyRid, true));
  const headers = next.headers;
  const inner = newInnerRequest(next.method, next.url, () => headers, body, false);
  return fromInnerRequest(inner, "immutable");
}

/** Whether a value is a Response this runtime can send. */
function isResponse(value) {
  return value !== null && typeof value === "object" &&
    ObjectPrototypeIsPrototypeOf(ResponsePrototype, value);
}

/**
 * Sends a handler's Response for dispatch `id`. Throws a TypeError (to be reported with
 * fail()) when the response cannot be sent.
 */
function respond(id, response) {
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
    op_dispatch_respond(id, inner.status, headers, null, null);
    return;
  }
  const source = body.streamOrStatic;
  if (ObjectPrototypeIsPrototypeOf(ReadableStreamPrototype, source)) {
    const backing = getReadableStreamResourceBacking(source);
    const rid = backing !== undefined && backing.autoClose
      ? backing.rid
      : resourceForReadableStream(source);
    op_dispatch_respond(id, inner.status, headers, null, rid);
    return;
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
  op_dispatch_respond(id, inner.status, headers, bytes, null);
}

/** Reports a failed dispatch: `notAResponse` when the handler returned a non-Response. */
function fail(id, notAResponse, detail) {
  op_dispatch_fail(id, notAResponse, detail);
}

export { fail, isResponse, nextRequest, respond, toRequest };
