// The example handler served by `cargo run -- serve runtime/examples/hello.ts`.
export default {
  fetch(request: Request, _env: Record<string, string>, _ctx: { waitUntil(p: Promise<unknown>): void }): Response {
    return new Response(`hello from ${new URL(request.url).pathname}\n`);
  },
};
