// A hello world: answers every path with where it was served.
export default {
  fetch(request: Request, env: Env): Response {
    const url = new URL(request.url);
    const where = request.cf?.colo ?? env.OUTPOST_POP ?? "this machine";
    return new Response(`Hello from ${url.pathname} at ${where}\n`);
  },
} satisfies ExportedHandler;
