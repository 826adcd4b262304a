// Outpost's isolate bootstrap.
//
// At snapshot time (module top level): load the Web API scripts from deno_web, deno_fetch
// and deno_crypto, install the WinterTC global scope, and publish the two entry points Rust
// calls on every new isolate through globalThis.__outpost:
//   bootstrap()            hides the Deno internals before any tenant code runs;
//   serve(namespace, env, maxSubrequests, consoleCap, services)  finds the handler and
//                          starts the request loop.

import { core, internals, primordials } from "ext:core/mod.js";
import { op_bootstrap_console } from "ext:core/ops";
import {
  claimSubrequest,
  currentScope,
  dispatchId,
  fail,
  isResponse,
  newRequestScope,
  nextRequest,
  respond,
  responseParts,
  runForRequest,
  serviceFetch,
  toRequest,
} from "ext:outpost_dispatch/01_dispatch.js";
import { Cache, caches, CacheStorage } from "ext:outpost_cache/01_cache.js";

const {
  ArrayPrototypeFilter,
  ArrayPrototypeJoin,
  Error,
  FunctionPrototypeCall,
  ObjectDefineProperty,
  ObjectFreeze,
  ObjectPrototypeIsPrototypeOf,
  ObjectSetPrototypeOf,
  PromisePrototypeThen,
  PromiseReject,
  RegExpPrototypeTest,
  SafeArrayIterator,
  SafeSet,
  SetPrototypeAdd,
  SetPrototypeDelete,
  StringPrototypeCharCodeAt,
  StringPrototypeIncludes,
  StringPrototypeSplit,
  Symbol,
  TypeError,
} = primordials;

// deno_fetch's 26_fetch.js reads these slots, which deno_telemetry fills in Deno. Outpost
// has no OpenTelemetry export yet: tracing is off and every hook is a no-op.
const noop = () => {};
internals.__telemetry = {
  builtinTracer: () => undefined,
  ContextManager: { active: () => undefined },
  DID_NOT_ENTER: Symbol("did not enter"),
  enterSpan: noop,
  exitSpan: noop,
  TRACING_ENABLED: false,
  PROPAGATORS: [],
};
internals.__telemetryUtil = {
  updateSpanFromClientResponse: noop,
  updateSpanFromError: noop,
  updateSpanFromRequest: noop,
};
// deno_crypto brands CryptoKeys with this symbol (deno_node sets it in Deno).
internals.kKeyObject = Symbol("kKeyObject");

const load = (specifier) => core.loadExtScript(specifier);
const webidl = load("ext:deno_webidl/00_webidl.js");
const url = load("ext:deno_web/00_url.js");
const urlPattern = load("ext:deno_web/01_urlpattern.js");
const consoleMod = load("ext:deno_web/01_console.js");
const domException = load("ext:deno_web/01_dom_exception.js");
const event = load("ext:deno_web/02_event.js");
const timers = load("ext:deno_web/02_timers.js");
const abortSignal = load("ext:deno_web/03_abort_signal.js");
const base64 = load("ext:deno_web/05_base64.js");
const streams = load("ext:deno_web/06_streams.js");
const encoding = load("ext:deno_web/08_text_encoding.js");
const file = load("ext:deno_web/09_file.js");
const messagePort = load("ext:deno_web/13_message_port.js");
const compression = load("ext:deno_web/14_compression.js");
const performanceMod = load("ext:deno_web/15_performance.js");
const headers = load("ext:deno_fetch/20_headers.js");
const formData = load("ext:deno_fetch/21_formdata.js");
const request = load("ext:deno_fetch/23_request.js");
const response = load("ext:deno_fetch/23_response.js");
const fetchMod = load("ext:deno_fetch/26_fetch.js");
const crypto = load("ext:deno_crypto/00_crypto.js");

const { EventTarget } = event;

// Ops fail with an error class name; deno_core builds the JS error from the builder
// registered for that name and throws `undefined` when there is none (Deno registers these
// in its own runtime, which Outpost does not load). DOMException classes, used by atob,
// WebCrypto, streams and structuredClone:
for (
  const name of [
    "AbortError",
    "DataCloneError",
    "DataError",
    "EncodingError",
    "IndexSizeError",
    "InvalidAccessError",
    "InvalidCharacterError",
    "InvalidStateError",
    "NetworkError",
    "NotAllowedError",
    "NotFoundError",
    "NotSupportedError",
    "OperationError",
    "QuotaExceededError",
    "SecurityError",
    "SyntaxError",
    "TimeoutError",
    "TypeMismatchError",
  ]
) {
  core.registerErrorBuilder(
    `DOMException${name}`,
    (message) => new domException.DOMException(message, name),
  );
}
// Deno's I/O classes become plain Errors carrying the name: handlers have no Deno.errors to
// match them against. (deno_core registers BadResource, Interrupted and NotCapable itself.)
for (
  const name of [
    "AddrInUse",
    "AddrNotAvailable",
    "AlreadyExists",
    "BrokenPipe",
    "Busy",
    "ConnectionAborted",
    "ConnectionRefused",
    "ConnectionReset",
    "FilesystemLoop",
    "Http",
    "InvalidData",
    "IsADirectory",
    "NetworkUnreachable",
    "NotADirectory",
    "NotConnected",
    "NotFound",
    "NotSupported",
    "PermissionDenied",
    "TimedOut",
    "UnexpectedEof",
    "WouldBlock",
    "WriteZero",
  ]
) {
  core.registerErrorBuilder(name, (message) => {
    const error = new Error(message);
    error.name = name;
    return error;
  });
}

/** The global scope's class, as in Workers: an EventTarget for the "fetch" event. */
class ServiceWorkerGlobalScope extends EventTarget {
  constructor() {
    super(webidl.illegalConstructorKey);
    webidl.illegalConstructor();
  }
}

const navigator = ObjectFreeze({ userAgent: "Outpost/0.1" });

/** UTF-8 length of a string, without encoding it. */
function utf8Length(text) {
  let length = 0;
  for (let i = 0; i < text.length; i++) {
    const unit = StringPrototypeCharCodeAt(text, i);
    if (unit < 0x80) length += 1;
    else if (unit < 0x800) length += 2;
    else if (unit >= 0xd800 && unit < 0xdc00 && i + 1 < text.length) {
      length += 4;
      i++;
    } else length += 3;
  }
  return length;
}

// Log lines carry no terminal colour codes, whatever is printed.
consoleMod.setNoColorFns(() => true, () => true);

/** A stack frame in one of Outpost's or Deno's own scripts. */
const INTERNAL_FRAME = /^\s+at (?:.* \()?ext:[^)]*\)?$/;

/**
 * `text` without stack frames of Outpost's and Deno's own scripts (`ext:` specifiers): a
 * handler's author can do nothing with them.
 */
function withoutInternalFrames(text) {
  if (!StringPrototypeIncludes(text, "ext:")) return text;
  const lines = StringPrototypeSplit(text, "\n");
  const kept = ArrayPrototypeFilter(
    lines,
    (line) => !RegExpPrototypeTest(INTERNAL_FRAME, line),
  );
  return ArrayPrototypeJoin(kept, "\n");
}

/**
 * Handler console output goes to the server log with the function and, inside a request,
 * the request id. A request may write `log.console_bytes_per_request` bytes; past that its
 * output is dropped, with one warning saying so.
 */
const console = new consoleMod.Console((text, level) => {
  const message = withoutInternalFrames(text);
  const scope = currentScope();
  if (scope === undefined) {
    op_bootstrap_console(level, "", message);
    return;
  }
  if (scope.consoleBytes > scope.consoleCap) return;
  scope.consoleBytes += utf8Length(message);
  if (scope.consoleBytes <= scope.consoleCap) {
    op_bootstrap_console(level, scope.requestId, message);
    return;
  }
  op_bootstrap_console(
    2,
    scope.requestId,
    `console output of this request stopped at ${scope.consoleCap} bytes ` +
      "(log.console_bytes_per_request); the rest is dropped",
  );
});

const cls = core.propNonEnumerable;
const fn = core.propWritable;
const globalScope = {
  // WinterTC Minimum Common API, in the order of its list.
  AbortController: cls(abortSignal.AbortController),
  AbortSignal: cls(abortSignal.AbortSignal),
  Blob: cls(file.Blob),
  ByteLengthQueuingStrategy: cls(streams.ByteLengthQueuingStrategy),
  CompressionStream: cls(compression.CompressionStream),
  CountQueuingStrategy: cls(streams.CountQueuingStrategy),
  Crypto: cls(crypto.Crypto),
  CryptoKey: cls(crypto.CryptoKey),
  DecompressionStream: cls(compression.DecompressionStream),
  DOMException: cls(domException.DOMException),
  Event: cls(event.Event),
  EventTarget: cls(event.EventTarget),
  File: cls(file.File),
  FormData: cls(formData.FormData),
  Headers: cls(headers.Headers),
  ReadableByteStreamController: cls(streams.ReadableByteStreamController),
  ReadableStream: cls(streams.ReadableStream),
  ReadableStreamBYOBReader: cls(streams.ReadableStreamBYOBReader),
  ReadableStreamBYOBRequest: cls(streams.ReadableStreamBYOBRequest),
  ReadableStreamDefaultController: cls(streams.ReadableStreamDefaultController),
  ReadableStreamDefaultReader: cls(streams.ReadableStreamDefaultReader),
  Request: cls(request.Request),
  Response: cls(response.Response),
  SubtleCrypto: cls(crypto.SubtleCrypto),
  TextDecoder: cls(encoding.TextDecoder),
  TextDecoderStream: cls(encoding.TextDecoderStream),
  TextEncoder: cls(encoding.TextEncoder),
  TextEncoderStream: cls(encoding.TextEncoderStream),
  TransformStream: cls(streams.TransformStream),
  TransformStreamDefaultController: cls(streams.TransformStreamDefaultController),
  URL: cls(url.URL),
  URLSearchParams: cls(url.URLSearchParams),
  WritableStream: cls(streams.WritableStream),
  WritableStreamDefaultController: cls(streams.WritableStreamDefaultController),
  WritableStreamDefaultWriter: cls(streams.WritableStreamDefaultWriter),
  atob: fn(base64.atob),
  btoa: fn(base64.btoa),
  clearInterval: fn(timers.clearInterval),
  clearTimeout: fn(timers.clearTimeout),
  console: cls(console),
  crypto: core.propGetterOnly(() => crypto.crypto),
  fetch: fn(fetch),
  navigator: core.propGetterOnly(() => navigator),
  performance: cls(performanceMod.performance),
  reportError: fn(reportError),
  self: core.propGetterOnly(() => globalThis),
  setInterval: fn(timers.setInterval),
  setTimeout: fn(timers.setTimeout),
  structuredClone: fn(messagePort.structuredClone),
  // Beyond the minimum, as Workers and Deno provide them.
  Cache: cls(Cache),
  CacheStorage: cls(CacheStorage),
  caches: core.propGetterOnly(() => caches),
  CustomEvent: cls(event.CustomEvent),
  ErrorEvent: cls(event.ErrorEvent),
  MessageChannel: cls(messagePort.MessageChannel),
  MessageEvent: cls(event.MessageEvent),
  MessagePort: cls(messagePort.MessagePort),
  Performance: cls(performanceMod.Performance),
  PerformanceEntry: cls(performanceMod.PerformanceEntry),
  PerformanceMark: cls(performanceMod.PerformanceMark),
  PerformanceMeasure: cls(performanceMod.PerformanceMeasure),
  PromiseRejectionEvent: cls(event.PromiseRejectionEvent),
  ServiceWorkerGlobalScope: cls(ServiceWorkerGlobalScope),
  URLPattern: cls(urlPattern.URLPattern),
};

core.defineGlobalProperties(globalThis, globalScope);
ObjectSetPrototypeOf(globalThis, ServiceWorkerGlobalScope.prototype);
// EventTarget methods brand-check their receiver; the global scope is one.
ObjectDefineProperty(globalThis, webidl.brand, {
  __proto__: null,
  value: webidl.brand,
  configurable: true,
});
event.setEventTargetData(globalThis);
event.saveGlobalThisReference(globalThis);

/** Renders a thrown value for the server log: the stack when there is one. */
function describeError(error) {
  if (ObjectPrototypeIsPrototypeOf(Error.prototype, error) && error.stack) {
    return withoutInternalFrames(error.stack);
  }
  return withoutInternalFrames(consoleMod.inspect(error));
}

/**
 * What happens to an exception nothing caught outside a handler's promise chain (a timer
 * callback, a microtask, reportError()): it is logged and the isolate carries on, as in
 * Workers. Deno's default would end the isolate, and with it every request in flight.
 */
function reportUncaught(error) {
  console.error(`Uncaught ${describeError(error)}`);
}

function reportError(error) {
  webidl.requiredArguments(arguments.length, 1, "Failed to execute 'reportError'");
  reportUncaught(error);
}

/**
 * Whether a fetch() failure is the egress policy refusing the destination: deno_fetch
 * raises NotCapable for a denied URL, and a TypeError caused by it for a host name that
 * resolved to a denied address.
 */
function isEgressDenial(error) {
  const denial = (e) =>
    e !== null && typeof e === "object" &&
    (e.name === "NotCapable" ||
      (typeof e.message === "string" &&
        StringPrototypeIncludes(e.message, "Requires net access")));
  return denial(error) || (error !== null && typeof error === "object" && denial(error.cause));
}

/**
 * fetch(), counted against the request it is made for (limits.max_subrequests), carrying
 * that request's trace context (W3C traceparent/tracestate, unless the handler set them),
 * and whose egress denials are TypeErrors that say what was refused and why.
 */
function fetch(input, init = undefined) {
  const refused = claimSubrequest();
  if (refused !== null) return PromiseReject(refused);
  const trace = currentScope()?.trace ?? null;
  let outbound = input;
  if (trace !== null) {
    try {
      outbound = new request.Request(input, init);
    } catch (error) {
      return PromiseReject(error);
    }
    const headers = outbound.headers;
    if (!headers.has("traceparent")) {
      headers.set("traceparent", trace.traceparent);
      if (trace.tracestate && !headers.has("tracestate")) {
        headers.set("tracestate", trace.tracestate);
      }
    }
    init = undefined;
  }
  return PromisePrototypeThen(fetchMod.fetch(outbound, init), undefined, (error) => {
    if (!isEgressDenial(error)) throw error;
    const target = typeof input === "string"
      ? input
      : (input !== null && typeof input === "object" && typeof input.url === "string")
      ? input.url
      : String(input);
    throw new TypeError(
      `fetch() to ${target} was refused by this node's egress policy: private, loopback and ` +
        "link-local addresses are blocked, as is any host outside the function's egress allow list",
      { cause: error },
    );
  });
}

/**
 * A service binding on `env` (`[[functions]] services = { AUTH = "auth" }`): `fetch()` sends
 * the request to the bound function on this node, in-process.
 */
class ServiceBinding {
  #binding;
  constructor(binding) {
    this.#binding = binding;
  }
  fetch(input, init = undefined) {
    return serviceFetch(this.#binding, input, init);
  }
}

/** The `ctx` argument of module handlers and the base of FetchEvent.waitUntil. */
class ExecutionContext {
  #pending;
  constructor(pending) {
    this.#pending = pending;
  }
  /** Keeps the isolate working on `promise` after the response has been sent. */
  waitUntil(promise) {
    const pending = this.#pending;
    const tracked = PromisePrototypeThen(
      promise,
      () => SetPrototypeDelete(pending, tracked),
      (error) => {
        SetPrototypeDelete(pending, tracked);
        console.error(`waitUntil promise rejected: ${describeError(error)}`);
      },
    );
    SetPrototypeAdd(pending, tracked);
  }
  /** Accepted for Workers compatibility; Outpost has no origin to fall through to. */
  passThroughOnException() {}
}

const kResponse = Symbol("response");

/** The event of service-worker style handlers: addEventListener("fetch", ...). */
class FetchEvent extends event.Event {
  #request;
  #ctx;
  constructor(request, ctx) {
    super("fetch", { cancelable: true });
    this.#request = request;
    this.#ctx = ctx;
    this[kResponse] = undefined;
  }
  get request() {
    return this.#request;
  }
  respondWith(response) {
    if (this[kResponse] !== undefined) {
      throw new domException.DOMException(
        "respondWith() was already called for this event",
        "InvalidStateError",
      );
    }
    this.preventDefault();
    this[kResponse] = response;
  }
  waitUntil(promise) {
    this.#ctx.waitUntil(promise);
  }
  passThroughOnException() {}
}

/** Finds the handler in a module namespace, or the registered "fetch" listeners. */
function findHandler(namespace) {
  const target = namespace.default;
  if (target !== null && target !== undefined) {
    if (typeof target.fetch === "function") {
      return { target, fetch: target.fetch };
    }
    throw new TypeError(
      "the default export has no fetch() method: export default { fetch(request, env, ctx) { ... } }",
    );
  }
  if (event.listenerCount(globalThis, "fetch") > 0) {
    return null;
  }
  throw new TypeError(
    "the module has no fetch handler: add `export default { fetch(request, env, ctx) { ... } }` " +
      'or call addEventListener("fetch", (event) => event.respondWith(...))',
  );
}

async function callHandler(handler, request, env, ctx) {
  if (handler !== null) {
    return await FunctionPrototypeCall(handler.fetch, handler.target, request, env, ctx);
  }
  const fetchEvent = new FetchEvent(request, ctx);
  globalThis.dispatchEvent(fetchEvent);
  if (fetchEvent[kResponse] === undefined) {
    throw new TypeError(
      "no fetch listener called event.respondWith() for this request",
    );
  }
  return await fetchEvent[kResponse];
}

async function handleRequest(next, handler, env, pending, { maxSubrequests, consoleCap }) {
  const id = dispatchId(next);
  // The handler, and the stream of its response, run as this request's work.
  const scope = newRequestScope(next, maxSubrequests, consoleCap);
  let result;
  try {
    const request = toRequest(next);
    const ctx = new ExecutionContext(pending);
    result = await runForRequest(scope, () => callHandler(handler, request, env, ctx));
  } catch (error) {
    fail(id, false, describeError(error));
    return;
  }
  if (!isResponse(result)) {
    fail(id, true, `the handler returned ${consoleMod.inspect(result)} instead of a Response`);
    return;
  }
  try {
    runForRequest(scope, () => respond(id, result));
  } catch (error) {
    fail(id, false, describeError(error));
  }
}

/** Hides Deno's internals from tenant code and arms the runtime-only hooks. */
function bootstrap() {
  performanceMod.setTimeOrigin();
  core.setWasmStreamingCallback(fetchMod.handleWasmStreaming);
  core.setReportExceptionCallback(reportUncaught);
  // One bad promise must not take the isolate down: log and carry on.
  core.setUnhandledPromiseRejectionHandler((_promise, reason) => {
    console.error(`Uncaught (in promise) ${describeError(reason)}`);
    return true;
  });
  delete globalThis.__outpost;
  delete globalThis.__bootstrap;
  delete globalThis.Deno;
}

/**
 * Starts serving with the handler module's namespace; each request may make
 * `maxSubrequests` fetch() calls and write `consoleCap` bytes of console output; `env`
 * gets a ServiceBinding for each name of `services`. Throws when the module has no
 * handler. Returns a promise that settles once the request queue is closed, every request
 * taken has been answered and all waitUntil() work has finished.
 */
function serve(namespace, env, maxSubrequests, consoleCap, services) {
  const handler = findHandler(namespace);
  for (const binding of new SafeArrayIterator(services)) {
    env[binding] = ObjectFreeze(new ServiceBinding(binding));
  }
  ObjectFreeze(env);
  const pending = new SafeSet();
  const limits = { maxSubrequests, consoleCap };
  // Requests whose handler has not finished yet; once the queue is closed, the last one to
  // finish lets the loop end.
  let answering = 0;
  let lastAnswered = null;
  const answered = () => {
    answering--;
    if (answering === 0 && lastAnswered !== null) lastAnswered();
  };
  return (async () => {
    while (true) {
      const next = await nextRequest();
      if (next === null) break;
      answering++;
      PromisePrototypeThen(handleRequest(next, handler, env, pending, limits), answered);
    }
    if (answering > 0) {
      await new Promise((resolve) => {
        lastAnswered = resolve;
      });
    }
    for (const promise of pending) {
      try {
        await promise;
      } catch {
        // Already logged by waitUntil.
      }
    }
  })();
}

/**
 * Runs the request path once while the snapshot is built, so the snapshot carries its
 * bytecode and a new isolate does not compile it on its first request. Touches no op that
 * needs a request and leaves nothing behind. (deno_core's separate warm-up pass,
 * create_snapshot's warmup_script, produced snapshots that crashed on load here.)
 */
function warmup() {
  // As op_dispatch_next gives it (see ext/dispatch).
  const next = [
    0,
    "POST",
    "http://warmup.invalid/path?query=1",
    [["content-type", "text/plain"], ["accept-encoding", "br"]],
    null,
    [["colo", "warmup"], ["asn", "1"]],
    "warmup",
    null,
    null,
  ];
  const request = toRequest(next);
  const url = new URL(request.url);
  request.headers.get(url.searchParams.get("query") ?? "accept");
  newRequestScope(next, 1, 1);
  if (request.cf.colo !== "warmup") throw new Error("request.cf is not wired");
  const handler = findHandler({ default: { fetch: () => new Response("") } });
  callHandler(handler, request, {}, new ExecutionContext(new SafeSet()));
  for (
    const response of [
      new Response("text", { status: 201, headers: { "x-warmup": "1" } }),
      new Response(new Uint8Array(1)),
      Response.json({ warm: true }),
      new Response(null, { status: 204 }),
    ]
  ) {
    if (isResponse(response)) responseParts(response);
  }
}

ObjectDefineProperty(globalThis, "__outpost", {
  __proto__: null,
  value: { bootstrap, serve },
  configurable: true,
});

warmup();
