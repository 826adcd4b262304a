// The Cache API of the outpost_cache extension: `caches.default`, `caches.open(name)`, and
// `match` / `put` / `delete` on them, as Workers offer it. Requests and Responses are
// deno_fetch's; entries live in the node's shared cache, keyed by the function (the
// namespace Rust holds, never chosen here), the cache and the URL.

import { core, primordials } from "ext:core/mod.js";
import {
  op_cache_delete,
  op_cache_match,
  op_cache_max_entry_bytes,
  op_cache_put,
  op_cache_refuse_oversized,
} from "ext:core/ops";

const webidl = core.loadExtScript("ext:deno_webidl/00_webidl.js");
const { Request, RequestPrototype, toInnerRequest } = core.loadExtScript(
  "ext:deno_fetch/23_request.js",
);
const {
  nullBodyStatus,
  Response,
  responseBodyUsed,
  toInnerResponse,
  wireHeaderList,
} = core.loadExtScript("ext:deno_fetch/23_response.js");

const {
  ArrayPrototypePush,
  ObjectPrototypeIsPrototypeOf,
  PromiseResolve,
  StringPrototypeSplit,
  StringPrototypeStartsWith,
  StringPrototypeTrim,
  Symbol,
  SymbolFor,
  TypeError,
  TypedArrayPrototypeGetByteLength,
  TypedArrayPrototypeSet,
  Uint8Array,
} = primordials;

const kName = Symbol("cacheName");
const illegalConstructor = Symbol("illegalConstructor");

/** A Request for `input` (a Request or a URL string); throws a TypeError for a bad URL. */
function toRequest(input) {
  return ObjectPrototypeIsPrototypeOf(RequestPrototype, input) ? input : new Request(input);
}

/** The URL a request is cached under: http(s) only, without the fragment. */
function cacheUrl(request, operation) {
  const url = request.url;
  if (!StringPrototypeStartsWith(url, "http:") && !StringPrototypeStartsWith(url, "https:")) {
    throw new TypeError(`Cache.${operation}: only http and https URLs can be cached, not ${url}`);
  }
  return StringPrototypeSplit(url, "#")[0];
}

/** Whether a response's Vary header lists `*` (it can never be matched). */
function variesOnEverything(response) {
  const vary = response.headers.get("vary");
  if (vary === null) return false;
  for (const field of new primordials.SafeArrayIterator(StringPrototypeSplit(vary, ","))) {
    if (StringPrototypeTrim(field) === "*") return true;
  }
  return false;
}

/**
 * Reads a response body up to `limit` bytes. Returns the bytes, or null when the body is
 * larger (the rest is not read: the stream is cancelled).
 */
async function readBody(response, limit) {
  if (response.body === null) return new Uint8Array(0);
  const reader = response.body.getReader();
  const chunks = [];
  let length = 0;
  while (true) {
    const { done, value } = await reader.read();
    if (done) break;
    length += TypedArrayPrototypeGetByteLength(value);
    if (length > limit) {
      await reader.cancel("larger than the cache takes for one entry");
      return null;
    }
    ArrayPrototypePush(chunks, value);
  }
  const bytes = new Uint8Array(length);
  let offset = 0;
  for (const chunk of new primordials.SafeArrayIterator(chunks)) {
    TypedArrayPrototypeSet(bytes, chunk, offset);
    offset += TypedArrayPrototypeGetByteLength(chunk);
  }
  return bytes;
}

class Cache {
  [kName];

  constructor(key = undefined, name = null) {
    if (key !== illegalConstructor) {
      webidl.illegalConstructor();
    }
    this[webidl.brand] = webidl.brand;
    this[kName] = name;
  }

  /**
   * The stored response for `request`, or undefined. Only GET requests match, unless
   * `options.ignoreMethod` is set. Every call returns a new Response.
   */
  async match(request, options = undefined) {
    webidl.assertBranded(this, CachePrototype);
    const prefix = "Failed to execute 'match' on 'Cache'";
    webidl.requiredArguments(arguments.length, 1, prefix);
    request = toRequest(request);
    if (request.method !== "GET" && !options?.ignoreMethod) return undefined;
    const url = cacheUrl(request, "match");
    const found = op_cache_match(this[kName], url, toInnerRequest(request).headerList);
    if (found === null) return undefined;
    const body = nullBodyStatus(found.status) ? null : found.body;
    return new Response(body, { status: found.status, headers: found.headers });
  }

  /**
   * Stores `response` for `request` (GET only). Consumes the response body. Responses the
   * HTTP caching rules do not allow to be stored, or larger than the cache takes, are not
   * stored and the promise still resolves, as in Workers.
   */
  async put(request, response) {
    webidl.assertBranded(this, CachePrototype);
    const prefix = "Failed to execute 'put' on 'Cache'";
    webidl.requiredArguments(arguments.length, 2, prefix);
    request = toRequest(request);
    response = webidl.converters.Response(response, prefix, "Argument 2");
    if (request.method !== "GET") {
      throw new TypeError(`${prefix}: only GET requests can be cached, not ${request.method}`);
    }
    const url = cacheUrl(request, "put");
    if (response.status === 206) {
      throw new TypeError(`${prefix}: partial responses (206) cannot be cached`);
    }
    if (variesOnEverything(response)) {
      throw new TypeError(`${prefix}: a response with "Vary: *" cannot be cached`);
    }
    if (responseBodyUsed(response) || response.body?.locked) {
      throw new TypeError(`${prefix}: the response body was already used`);
    }
    const requestHeaders = toInnerRequest(request).headerList;
    const responseHeaders = wireHeaderList(toInnerResponse(response));
    const body = await readBody(response, op_cache_max_entry_bytes());
    if (body === null) {
      op_cache_refuse_oversized(url);
      return undefined;
    }
    op_cache_put(this[kName], url, requestHeaders, response.status, responseHeaders, body);
    return undefined;
  }

  /** Removes what is stored for `request`; resolves to whether anything was. */
  async delete(request, options = undefined) {
    webidl.assertBranded(this, CachePrototype);
    const prefix = "Failed to execute 'delete' on 'Cache'";
    webidl.requiredArguments(arguments.length, 1, prefix);
    request = toRequest(request);
    if (request.method !== "GET" && !options?.ignoreMethod) return false;
    const url = cacheUrl(request, "delete");
    return op_cache_delete(this[kName], url, toInnerRequest(request).headerList);
  }

  [SymbolFor("Deno.privateCustomInspect")](inspect, inspectOptions) {
    return `Cache ${inspect({ name: this[kName] ?? "default" }, inspectOptions)}`;
  }
}

webidl.configureInterface(Cache);
const CachePrototype = Cache.prototype;

const kDefault = Symbol("defaultCache");

class CacheStorage {
  [kDefault];

  constructor(key = undefined) {
    if (key !== illegalConstructor) {
      webidl.illegalConstructor();
    }
    this[webidl.brand] = webidl.brand;
    this[kDefault] = new Cache(illegalConstructor, null);
  }

  /** The function's default cache. */
  get default() {
    webidl.assertBranded(this, CacheStoragePrototype);
    return this[kDefault];
  }

  /** The function's cache called `name`. */
  open(name) {
    webidl.assertBranded(this, CacheStoragePrototype);
    const prefix = "Failed to execute 'open' on 'CacheStorage'";
    webidl.requiredArguments(arguments.length, 1, prefix);
    name = webidl.converters.DOMString(name, prefix, "Argument 1");
    return PromiseResolve(new Cache(illegalConstructor, name));
  }
}

webidl.configureInterface(CacheStorage);
const CacheStoragePrototype = CacheStorage.prototype;

const caches = new CacheStorage(illegalConstructor);

export { Cache, caches, CacheStorage };
