// Types of what Outpost gives a handler. Written by `outpost init`; kept beside the function
// and named by tsconfig.json.

/** What Outpost knows of the client and the PoP (`request.cf`); every field is text. */
interface IncomingRequestCfProperties {
  country?: string;
  region?: string;
  regionCode?: string;
  city?: string;
  postalCode?: string;
  latitude?: string;
  longitude?: string;
  timezone?: string;
  continent?: string;
  asn?: string;
  asOrganization?: string;
  clientIp?: string;
  /** The PoP that served the request (`[node] pop`). */
  colo?: string;
}

interface Request {
  readonly cf?: IncomingRequestCfProperties;
}

/** The node's shared cache: `caches.default` is the function's own. */
interface CacheStorage {
  readonly default: Cache;
}

/** The third argument of `fetch`: work that may outlive the response. */
interface ExecutionContext {
  waitUntil(promise: Promise<unknown>): void;
  passThroughOnException(): void;
}

/** A function's `env`: its `env` settings and secrets from the config or manifest. */
interface Env {
  /** The PoP this node serves (`[node] pop`), when set. */
  OUTPOST_POP?: string;
  /** The node's region (`[node] region`), when set. */
  OUTPOST_REGION?: string;
}

/** A service binding on `env`: calls another function of the node in-process. */
interface Fetcher {
  fetch(input: Request | string | URL, init?: RequestInit): Promise<Response>;
}

/** What a module's default export may be. */
interface ExportedHandler<E = Env> {
  fetch?(request: Request, env: E, ctx: ExecutionContext): Response | Promise<Response>;
}
