// Cache-through: answers from the node's shared cache when it can, makes the answer (here a
// slow computation standing in for an origin fetch) and stores it when it cannot.
async function render(path: string): Promise<Response> {
  await new Promise((resolve) => setTimeout(resolve, 50));
  return new Response(`rendered ${path} at ${new Date().toISOString()}\n`, {
    headers: { "cache-control": "public, max-age=60", "content-type": "text/plain" },
  });
}

export default {
  async fetch(request: Request, _env: Env, ctx: ExecutionContext): Promise<Response> {
    if (request.method !== "GET") return new Response("GET only\n", { status: 405 });
    const cache = caches.default;
    const cached = await cache.match(request);
    if (cached) return new Response(cached.body, { headers: { ...Object.fromEntries(cached.headers), "x-cache": "hit" } });
    const response = await render(new URL(request.url).pathname);
    ctx.waitUntil(cache.put(request, response.clone()));
    return new Response(response.body, { headers: { ...Object.fromEntries(response.headers), "x-cache": "miss" } });
  },
} satisfies ExportedHandler;
