// A small JSON API routed with URLPattern: GET /items, GET /items/:id, POST /items.
const items = new Map<string, { id: string; name: string }>([["1", { id: "1", name: "first" }]]);

const routes: [string, URLPattern, (request: Request, groups: Record<string, string | undefined>) => Response | Promise<Response>][] = [
  ["GET", new URLPattern({ pathname: "/items" }), () => Response.json([...items.values()])],
  ["GET", new URLPattern({ pathname: "/items/:id" }), (_request, { id }) => {
    const item = items.get(id ?? "");
    return item ? Response.json(item) : Response.json({ error: "no such item" }, { status: 404 });
  }],
  ["POST", new URLPattern({ pathname: "/items" }), async (request) => {
    const { name } = await request.json() as { name?: string };
    if (!name) return Response.json({ error: "name is required" }, { status: 400 });
    const item = { id: String(items.size + 1), name };
    items.set(item.id, item);
    return Response.json(item, { status: 201 });
  }],
];

export default {
  async fetch(request: Request): Promise<Response> {
    for (const [method, pattern, handle] of routes) {
      const match = pattern.exec(request.url);
      if (match && request.method === method) return handle(request, match.pathname.groups);
    }
    return Response.json({ error: `no route for ${request.method} ${new URL(request.url).pathname}` }, { status: 404 });
  },
} satisfies ExportedHandler;
