// Runs before resources/testharness.js in every WPT isolate. It gives the test what the WPT
// server's wrapper for `.any.js` files in a worker would: `GLOBAL`, a `location` (the test's
// URL, so `location.search` and default test titles work) and, for tests that load JSON
// data, a `fetch()` that answers with the files the runner read for it.
//
// `__wptConfig` ({ url, fixtures: { "/path": text } }) is defined by the runner just before.
"use strict";
((config) => {
  const define = (name, value) =>
    Object.defineProperty(globalThis, name, {
      value,
      configurable: true,
      writable: true,
      enumerable: false,
    });
  delete globalThis.__wptConfig;
  define("GLOBAL", {
    isWindow: () => false,
    isWorker: () => true,
    isShadowRealm: () => false,
  });
  define("location", new URL(config.url));
  const paths = Object.keys(config.fixtures);
  if (paths.length === 0) return;
  const networkFetch = globalThis.fetch;
  define("fetch", function fetch(input, init) {
    const href = input instanceof Request ? input.url : String(input);
    const target = new URL(href, config.url);
    if (target.origin === location.origin && paths.includes(target.pathname)) {
      return Promise.resolve(
        new Response(config.fixtures[target.pathname], {
          headers: { "content-type": "application/json" },
        }),
      );
    }
    return networkFetch(input, init);
  });
})(globalThis.__wptConfig);
