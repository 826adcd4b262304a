// Stand-in for ext:deno_net/02_tls.js. deno_fetch's 22_http_client.js imports
// loadTlsKeyPair for Deno.createHttpClient, which Outpost handlers cannot reach.
(function () {
  function loadTlsKeyPair() {
    throw new TypeError("custom TLS client certificates are not available in Outpost");
  }
  return { loadTlsKeyPair };
})();
