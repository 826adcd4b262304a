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
  ArrayIsArray,
  Number,
  ObjectDefineProperty,
  ObjectFreeze,
  ObjectPrototypeIsPrototypeOf,
  PromisePrototypeThen,
  SymbolFor,
  TypeError,
  TypedArrayPrototypeGetSymbolToStringTag,
} = primordials;

const { InnerBody } = core.loadExtScript("ext:deno_fetch/22_body.js");
const { fromInnerRequest, Request, RequestPrototype, toInnerRequest } = core
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

// A request from op_dispatch_next is one array (see NextRequest in lib.rs):
// [id, method, url, headers, bodyRid, cf, requestId, traceparent, tracestate].
const NEXT_ID = 0;
const NEXT_METHOD = 1;
const NEXT_URL = 2;
const NEXT_HEADERS = 3;
const NEXT_BODY_RID = 4;
const NEXT_CF = 5;
const NEXT_REQUEST_ID = 6;
const NEXT_TRACEPARENT = 7;
const NEXT_TRACESTATE = 8;

/** The dispatch id of a request from op_dispatch_next. */
function dispatchId(next) {
  return next[NEXT_ID];
}

/**
 * What is counted against one request from op_dispatch_next while its handler runs
 * (subrequests, console bytes against `consoleCap`), its request id, and the trace headers
 * its fetch() calls carry ({ traceparent, tracestate } or null).
 */
function newRequestScope(next, maxSubrequests, consoleCap) {
  const traceparent = next[NEXT_TRACEPARENT];
  const trace = traceparent === null
    ? null
    : { traceparent, tracestate: next[NEXT_TRACESTATE] };
  return {
    id: next[NEXT_ID],
    requestId: next[NEXT_REQUEST_ID],
    subrequests: 0,
    maxSubrequests,
    trace,
    consoleBytes: 0,
    consoleCap,
  };
}

/**
 * The request that running code works for is V8's async context (continuation-preserved
 * embedder data): V8 carries it through promise continuations, and deno_web carries it
 * through timers, so everything a handler starts, waitUntil() work included, stays
 * attributed to its request. Outpost is its only user in an isolate (tenants get no
 * AsyncLocalStorage), so the context is the request's scope itself: entering a request
 * allocates nothing (core.AsyncVariable would make a dictionary-mode object and a WeakMap
 * entry each time).
 */

/** The scope of the request running code works for, or undefined outside any request. */
function currentScope() {
  return core.getAsyncContext() ?? undefined;
}

/** Calls `fn` as work of the request `scope` belongs to; returns what it returns. */
function runForRequest(scope, fn) {
  const previous = core.getAsyncContext();
  core.setAsyncContext(scope);
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
  const scope = currentScope();
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
 * The inner request (deno_fetch's fields) of a request from the server. One class, its
 * accessors on the prototype, so that every request has the same hidden class; deno_fetch's
 * own newInnerRequest() builds an object literal with accessors, new closures and a new
 * shape transition on every request. The header list arrives whole from op_dispatch_next.
 */
class ServerInnerRequest {
  constructor(id, method, url, headerList, body) {
    this.dispatchId = id;
    this.methodInner = method;
    this.headerListInner = headerList;
    this.body = body;
    this.redirectMode = "follow";
    this.redirectCount = 0;
    this.urlList = [() => url];
    this.urlListProcessed = [url];
    this.clientRid = null;
    this.blobUrlEntry = null;
  }
  get method() {
    return this.methodInner;
  }
  set method(value) {
    this.methodInner = value;
  }
  get headerList() {
    return this.headerListInner;
  }
  set headerList(value) {
    this.headerListInner = value;
  }
  url() {
    return this.urlListProcessed[0];
  }
  currentUrl() {
    const current = this.urlList.length - 1;
    if (this.urlListProcessed[current] === undefined) {
      this.urlListProcessed[current] = this.urlList[current]();
    }
    return this.urlListProcessed[current];
  }
  /**
   * request.signal aborts when the request is cut short (the client went away, or a limit
   * ended it). deno_fetch asks for this only when a handler reads the signal.
   */
  onCancel(abort) {
    PromisePrototypeThen(op_dispatch_cancelled(this.dispatchId), (cancelled) => {
      if (cancelled) abort();
    });
  }
}

/**
 * `request.cf` of requests from the server: the [field, value] pairs op_dispatch_next gave,
 * until the handler first reads it; then the frozen object made of them.
 */
const kCf = SymbolFor("outpost.cf");

// `request.cf`, as in Workers: what is known of the client (country, city, ..., colo = the
// PoP, clientIp); undefined on requests a handler builds itself. A getter on the prototype,
// so that a request costs nothing for it unless read.
ObjectDefineProperty(RequestPrototype, "cf", {
  __proto__: null,
  get() {
    const cf = this[kCf];
    if (!ArrayIsArray(cf)) return cf;
    const fields = {};
    for (let i = 0; i < cf.length; i++) {
      const { 0: name, 1: value } = cf[i];
      fields[name] = name === "asn" ? Number(value) : value;
    }
    return (this[kCf] = ObjectFreeze(fields));
  },
  enumerable: true,
  configurable: true,
});

/** Builds a Request from a request of op_dispatch_next. */
function toRequest(next) {
  const bodyRid = next[NEXT_BODY_RID];
  const body = bodyRid === null ? null : new InnerBody(readableStreamForRid(bodyRid, true));
  const inner = new ServerInnerRequest(
    next[NEXT_ID],
    next[NEXT_METHOD],
    next[NEXT_URL],
    next[NEXT_HEADERS],
    body,
  );
  const request = fromInnerRequest(inner, "immutable");
  request[kCf] = next[NEXT_CF];
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
 * one of `bytes` (a string or a Uint8Array) and `stream` (a ReadableStream) is set. Throws a TypeError
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
  // A string goes as it is: op_dispatch_respond encodes it.
  const bytes = source.body;
  if (
    typeof bytes !== "string" &&
    TypedArrayPrototypeGetSymbolToStringTag(bytes) !== "Uint8Array"
  ) {
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
  dispatchId,
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
