// A geo redirect: / sends each visitor to the page of their country (request.cf.country).
export default {
  fetch(request: Request): Response {
    const url = new URL(request.url);
    const country = (request.cf?.country ?? "xx").toLowerCase();
    if (url.pathname === "/") return Response.redirect(new URL(`/${country}/`, url), 302);
    const page = url.pathname.split("/")[1] ?? "";
    return new Response(`Welcome to the ${page.toUpperCase()} page (you are in ${request.cf?.city ?? "an unknown city"})\n`);
  },
} satisfies ExportedHandler;
