//! Handler styles, languages, routing and error handling.

use std::time::Duration;

use crate::support::{Outpost, SendForText, functions_config, http1};

const TS_HANDLER: &str = r#"
import { shout } from "./lib/shout.ts";
import meta from "./meta.json" with { type: "json" };

interface Env { GREETING: string; OUTPOST_POP: string }
type Ctx = { waitUntil(p: Promise<unknown>): void };

export default {
  async fetch(request: Request, env: Env, _ctx: Ctx): Promise<Response> {
    const url = new URL(request.url);
    const body: string = `${shout(env.GREETING)} ${meta.name} ${url.pathname}${url.search} ${env.OUTPOST_POP}`;
    return new Response(body, { headers: { "x-url": request.url } });
  },
};
"#;

#[tokio::test]
async fn typescript_module_with_relative_and_json_imports() {
  let outpost = Outpost::start(
    &functions_config(
      "[node]\npop = \"ams1\"",
      &[(
        "api",
        "fn/index.ts",
        "routes = [\"/\"]\nenv = { GREETING = \"hello\" }",
      )],
    ),
    &[
      ("fn/index.ts", TS_HANDLER),
      (
        "fn/lib/shout.ts",
        "export const shout = (s: string): string => s.toUpperCase() + '!';",
      ),
      ("fn/meta.json", r#"{ "name": "outpost" }"#),
    ],
  );
  let response = http1().get(outpost.url("/a/b?x=1")).send().await.unwrap();
  assert_eq!(response.status(), 200);
  let expected_url = outpost.url("/a/b?x=1");
  assert_eq!(response.headers()["x-url"], expected_url.as_str());
  assert_eq!(
    response.text().await.unwrap(),
    "HELLO! outpost /a/b?x=1 ams1"
  );
}

#[tokio::test]
async fn javascript_module_and_service_worker_styles() {
  let outpost = Outpost::start(
    &functions_config(
      "",
      &[
        ("module", "module.js", r#"routes = ["/module/"]"#),
        ("worker", "worker.js", r#"routes = ["/sw/"]"#),
      ],
    ),
    &[
      (
        "module.js",
        "export default { fetch: (req) => new Response('module ' + new URL(req.url).pathname) };",
      ),
      (
        "worker.js",
        r#"addEventListener("fetch", (event) => {
             event.respondWith((async () => new Response("worker " + new URL(event.request.url).pathname))());
           });"#,
      ),
    ],
  );
  let client = http1();
  let module = client.get(outpost.url("/module/x")).send().await.unwrap();
  assert_eq!(module.text().await.unwrap(), "module /module/x");
  let worker = client.get(outpost.url("/sw/y")).send().await.unwrap();
  assert_eq!(worker.text().await.unwrap(), "worker /sw/y");
}

#[tokio::test]
async fn host_and_path_routing_with_outpost_marked_404() {
  let handler = |name: &str| format!("export default {{ fetch: () => new Response('{name}') }};");
  let (a, b, c, d) = (handler("a"), handler("b"), handler("c"), handler("d"));
  let outpost = Outpost::start(
    &functions_config(
      "",
      &[
        ("a", "a.js", r#"routes = ["api.example.com/"]"#),
        ("b", "b.js", r#"routes = ["example.com/api/", "/health"]"#),
        ("c", "c.js", r#"routes = ["*.example.com/"]"#),
        ("d", "d.js", r#"routes = ["example.com/"]"#),
      ],
    ),
    &[("a.js", &a), ("b.js", &b), ("c.js", &c), ("d.js", &d)],
  );
  let client = http1();
  for (host, path, expected) in [
    ("api.example.com", "/anything", "a"),
    ("example.com", "/api/users", "b"),
    ("other.org", "/health", "b"),
    ("www.example.com", "/", "c"),
    ("example.com", "/apix", "d"),
  ] {
    let response = client
      .get(outpost.url(path))
      .header("host", host)
      .send()
      .await
      .unwrap();
    assert_eq!(response.status(), 200, "{host}{path}");
    assert_eq!(response.text().await.unwrap(), expected, "{host}{path}");
  }
  let missing = client
    .get(outpost.url("/nothing"))
    .header("host", "other.org")
    .send()
    .await
    .unwrap();
  assert_eq!(missing.status(), 404);
  assert_eq!(missing.headers()["outpost-error"], "no-route");
  assert!(
    missing
      .text()
      .await
      .unwrap()
      .contains("no function is routed for other.org/nothing")
  );
}

#[tokio::test]
async fn uncaught_exception_is_500_and_isolate_keeps_serving() {
  let outpost = Outpost::start_handler(
    "handler.js",
    r#"
let served = 0;
export default {
  async fetch(request) {
    served += 1;
    if (new URL(request.url).pathname === "/throw") throw new Error("boom at request " + served);
    if (new URL(request.url).pathname === "/wrong") return { not: "a response" };
    return new Response("served " + served);
  },
};
"#,
  );
  let client = http1();
  let failed = client.get(outpost.url("/throw")).send().await.unwrap();
  assert_eq!(failed.status(), 500);
  let request_id = failed.headers()["outpost-request-id"]
    .to_str()
    .unwrap()
    .to_string();
  assert_eq!(failed.headers()["outpost-error"], "handler-error");
  assert!(failed.text().await.unwrap().contains(&request_id));
  let logs = outpost.wait_for_log("boom at request 1");
  let line = logs
    .lines()
    .find(|l| l.contains("boom at request 1"))
    .unwrap();
  assert!(line.contains("threw an exception"), "{line}");
  assert!(
    logs.contains(&request_id),
    "the log names the request id:\n{logs}"
  );
  assert!(
    logs.contains("handler.js:6:"),
    "the stack points into the handler:\n{logs}"
  );

  let wrong = client.get(outpost.url("/wrong")).send().await.unwrap();
  assert_eq!(wrong.status(), 500);
  outpost.wait_for_log(
    "did not return a Response: the handler returned { not: \"a response\" } instead of a Response",
  );

  // Same isolate, state intact: the counter kept going.
  let next = client.get(outpost.url("/ok")).send().await.unwrap();
  assert_eq!(next.status(), 200);
  assert_eq!(next.text().await.unwrap(), "served 3");
}

#[tokio::test]
async fn syntax_error_in_one_function_leaves_the_others_serving() {
  let outpost = Outpost::start(
    &functions_config(
      "",
      &[
        ("broken", "broken.ts", r#"routes = ["/broken"]"#),
        ("fine", "fine.js", r#"routes = ["/"]"#),
      ],
    ),
    &[
      (
        "broken.ts",
        "export default {\n  fetch(): Response {\n    return new Response(\"x\";\n  }\n};\n",
      ),
      (
        "fine.js",
        "export default { fetch: () => new Response('fine') };",
      ),
    ],
  );
  let body = unavailable(&outpost, "/broken").await;
  // The client learns which request failed, not the server's paths or source.
  assert!(
    body.contains("function \"broken\" is unavailable (request id "),
    "{body}"
  );
  assert!(
    !body.contains("broken.ts") && !body.contains(outpost.dir().to_str().unwrap()),
    "{body}"
  );
  // The log has the details, at file:line:col.
  let logs = outpost.wait_for_log("function failed to load");
  assert!(logs.contains("broken.ts:3:"), "{logs}");
  assert_eq!(outpost.get_text("/").await, "fine");
}

/// GETs `path`, expects Outpost's 503 for a function that cannot serve, and returns the body
/// after checking that it names the request id of the response.
async fn unavailable(outpost: &Outpost, path: &str) -> String {
  let response = http1().get(outpost.url(path)).send().await.unwrap();
  assert_eq!(response.status(), 503);
  assert_eq!(response.headers()["outpost-error"], "function-unavailable");
  let id = response.headers()["outpost-request-id"]
    .to_str()
    .unwrap()
    .to_string();
  let body = response.text().await.unwrap();
  assert!(body.contains(&format!("(request id {id})")), "{body}");
  body
}

#[tokio::test]
async fn error_details_put_the_load_error_into_the_body_for_development() {
  let outpost = Outpost::start(
    &functions_config(
      "[server]\nerror_details = true",
      &[("broken", "broken.js", r#"routes = ["/"]"#)],
    ),
    &[(
      "broken.js",
      "export default {\n  fetch() { return new Response(\"x\";\n}\n};\n",
    )],
  );
  let body = unavailable(&outpost, "/").await;
  assert!(body.contains("broken.js:2:"), "{body}");
}

#[tokio::test]
async fn handlers_see_wintertc_globals_and_no_deno() {
  let outpost = Outpost::start_handler(
    "globals.js",
    r#"
const names = [
  "AbortController", "AbortSignal", "Blob", "ByteLengthQueuingStrategy", "CompressionStream",
  "CountQueuingStrategy", "Crypto", "CryptoKey", "DecompressionStream", "DOMException", "Event",
  "EventTarget", "File", "FormData", "Headers", "ReadableByteStreamController", "ReadableStream",
  "ReadableStreamBYOBReader", "ReadableStreamBYOBRequest", "ReadableStreamDefaultController",
  "ReadableStreamDefaultReader", "Request", "Response", "SubtleCrypto", "TextDecoder",
  "TextDecoderStream", "TextEncoder", "TextEncoderStream", "TransformStream",
  "TransformStreamDefaultController", "URL", "URLSearchParams", "WebAssembly", "WritableStream",
  "WritableStreamDefaultController", "WritableStreamDefaultWriter", "atob", "btoa", "clearInterval",
  "clearTimeout", "console", "crypto", "fetch", "navigator", "performance", "queueMicrotask",
  "reportError", "setInterval", "setTimeout", "structuredClone", "URLPattern",
];
export default {
  async fetch() {
    const missing = names.filter((n) => typeof globalThis[n] === "undefined");
    const forbidden = ["Deno", "__bootstrap", "__outpost", "process", "require"].filter((n) => n in globalThis);
    const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode("abc"));
    const hex = [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
    const clone = structuredClone({ a: [1, 2] });
    const gz = await new Response(new Blob(["x".repeat(100)]).stream().pipeThrough(new CompressionStream("gzip"))).arrayBuffer();
    return Response.json({ missing, forbidden, hex, clone, uuid: crypto.randomUUID().length, ua: navigator.userAgent, gz: gz.byteLength > 0 });
  },
};
"#,
  );
  let json: serde_json::Value = http1()
    .get(outpost.url("/"))
    .send()
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
  assert_eq!(json["missing"], serde_json::json!([]), "{json}");
  assert_eq!(json["forbidden"], serde_json::json!([]), "{json}");
  assert_eq!(
    json["hex"],
    "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
  );
  assert_eq!(json["clone"], serde_json::json!({ "a": [1, 2] }));
  assert_eq!(json["uuid"], 36);
  assert!(json["ua"].as_str().unwrap().starts_with("Outpost/"));
  assert_eq!(json["gz"], true);
}

/// Errors that ops raise with a DOMException or Deno class reach handlers as real error
/// objects (deno_core throws `undefined` for a class nobody registered).
#[tokio::test]
async fn errors_from_ops_are_domexceptions_not_undefined() {
  // WebCrypto's first use in an isolate loads its JS: on a loaded machine that can take more
  // than the default 50 ms of CPU.
  let outpost = Outpost::start(
    &functions_config(
      "",
      &[(
        "errors",
        "errors.js",
        "routes = [\"/\"]\nlimits = { cpu_ms = 2000 }",
      )],
    ),
    &[(
      "errors.js",
      r#"
const describe = async (f) => {
  try { await f(); return "no error"; } catch (e) {
    return e === undefined ? "undefined" : `${e instanceof DOMException ? "DOMException" : e.constructor.name} ${e.name}`;
  }
};
export default {
  async fetch() {
    const key = await crypto.subtle.generateKey({ name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
    return Response.json([
      await describe(() => atob("!")),
      await describe(() => crypto.subtle.verify("HMAC", key, new Uint8Array(32), new Uint8Array(1))),
      await describe(() => crypto.subtle.importKey("raw", new Uint8Array(3), "AES-GCM", false, ["encrypt"])),
    ]);
  },
};
"#,
    )],
  );
  let text = outpost.get_text("/").await;
  let json: serde_json::Value =
    serde_json::from_str(&text).unwrap_or_else(|err| panic!("{err}: {text}"));
  assert_eq!(
    json,
    serde_json::json!([
      "DOMException InvalidCharacterError",
      "DOMException InvalidAccessError",
      "DOMException DataError",
    ])
  );
}

#[tokio::test]
async fn wait_until_work_continues_after_the_response() {
  let outpost = Outpost::start_handler(
    "wait.js",
    r#"
let finished = 0;
let finish;
export default {
  fetch(request, env, ctx) {
    const path = new URL(request.url).pathname;
    if (path === "/count") return new Response(String(finished));
    if (path === "/finish") {
      finish();
      return new Response("finishing");
    }
    // Work that outlives the response and ends only when /finish is called.
    ctx.waitUntil(new Promise((resolve) => { finish = resolve; }).then(() => { finished += 1; }));
    return new Response("started");
  },
};
"#,
  );
  assert_eq!(outpost.get_text("/start").await, "started");
  assert_eq!(outpost.get_text("/count").await, "0");
  assert_eq!(outpost.get_text("/finish").await, "finishing");
  outpost
    .wait_for_text("/count", "1", "the waitUntil work never finished")
    .await;
}

#[tokio::test]
async fn exceptions_outside_a_request_are_logged_and_the_isolate_lives_on() {
  let outpost = Outpost::start_handler(
    "late.js",
    r#"
let served = 0;
export default {
  fetch(request) {
    served += 1;
    const path = new URL(request.url).pathname;
    if (path === "/timer") setTimeout(() => { throw new Error("thrown in a timer"); }, 0);
    if (path === "/microtask") queueMicrotask(() => { throw new Error("thrown in a microtask"); });
    if (path === "/rejection") Promise.reject(new Error("rejected and unhandled"));
    if (path === "/report") reportError(new Error("reported"));
    return new Response(String(served));
  },
};
"#,
  );
  for (i, path) in ["/timer", "/microtask", "/rejection", "/report"]
    .iter()
    .enumerate()
  {
    let body = outpost.get_text(path).await;
    assert_eq!(body, (i + 1).to_string(), "{path}");
  }
  let logs = outpost.wait_for_log("Uncaught Error: reported");
  for message in [
    "Uncaught Error: thrown in a timer",
    "Uncaught Error: thrown in a microtask",
    "Uncaught (in promise) Error: rejected and unhandled",
  ] {
    assert!(logs.contains(message), "{message} missing from:\n{logs}");
  }
  // Still the same isolate: the counter kept going.
  let body = outpost.get_text("/").await;
  assert_eq!(body, "5");
  assert!(!logs.contains("isolate event loop failed"), "{logs}");
}

#[tokio::test]
async fn a_module_that_never_finishes_loading_is_stopped_and_reported() {
  let outpost = Outpost::start(
    &functions_config(
      "[server]\nload_timeout_ms = 1000",
      &[
        ("spins", "spins.js", "routes = [\"/spins\"]"),
        ("waits", "waits.js", "routes = [\"/waits\"]"),
        ("fine", "fine.js", "routes = [\"/\"]"),
      ],
    ),
    &[
      (
        "spins.js",
        "while (true) {}\nexport default { fetch: () => new Response('never') };",
      ),
      (
        "waits.js",
        "await new Promise(() => {});\nexport default { fetch: () => new Response('never') };",
      ),
      (
        "fine.js",
        "export default { fetch: () => new Response('fine') };",
      ),
    ],
  );
  unavailable(&outpost, "/spins").await;
  unavailable(&outpost, "/waits").await;
  let logs = outpost.wait_for_log("did not finish loading within 1s");
  assert!(
    logs.contains("Top-level await promise never resolved") && logs.contains("waits.js:1:1"),
    "{logs}"
  );
  assert_eq!(outpost.get_text("/").await, "fine");
}

/// `eval` and `new Function` are off by default, as in Workers, with a catchable EvalError;
/// `limits.allow_code_generation` turns them on.
#[tokio::test]
async fn code_generation_from_strings_follows_the_limit() {
  let evaluator = r#"export default {
  fetch() {
    const results = [];
    for (const attempt of [() => eval("1 + 1"), () => new Function("return 2")()]) {
      try { results.push(String(attempt())); } catch (error) { results.push(error.name); }
    }
    return new Response(results.join(" "));
  },
};"#;
  let outpost = Outpost::start(
    &functions_config(
      "",
      &[
        ("strict", "eval.js", r#"routes = ["strict.test/"]"#),
        (
          "lenient",
          "eval.js",
          "routes = [\"lenient.test/\"]\nlimits = { allow_code_generation = true }",
        ),
      ],
    ),
    &[("eval.js", evaluator)],
  );
  let get = |host: &'static str| {
    let url = outpost.url("/");
    async move {
      http1()
        .get(url)
        .header("host", host)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
    }
  };
  assert_eq!(get("strict.test").await, "EvalError EvalError");
  assert_eq!(get("lenient.test").await, "2 2");
}

/// `request.signal` aborts when the client goes away and when the wall-clock limit ends the
/// request, and stays quiet for a request that was answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_signal_aborts_on_disconnect_and_on_the_wall_clock_limit() {
  let outpost = Outpost::start(
    &functions_config(
      "",
      &[(
        "signal",
        "signal.js",
        "routes = [\"/\"]\nlimits = { wall_ms = 1500 }",
      )],
    ),
    &[(
      "signal.js",
      r#"export default {
  async fetch(request, env, ctx) {
    const path = new URL(request.url).pathname;
    request.signal.addEventListener("abort", () => console.log(`aborted ${path}: ${request.signal.reason.name}`));
    if (path === "/answered") {
      ctx.waitUntil(new Promise((r) => setTimeout(r, 300)).then(() => console.log(`answered: aborted=${request.signal.aborted}`)));
      return new Response("ok");
    }
    console.log(`waiting ${path}`);
    await new Promise((r) => setTimeout(r, 5000));
    return new Response("late");
  },
};"#,
    )],
  );
  // The client gives up.
  let gone = reqwest::Client::builder()
    .http1_only()
    .timeout(Duration::from_millis(400))
    .build()
    .unwrap()
    .get(outpost.url("/gone"))
    .send()
    .await;
  assert!(gone.is_err());
  tokio::task::block_in_place(|| outpost.wait_for_log("aborted /gone: AbortError"));
  // The wall-clock limit ends it.
  let limited = http1().get(outpost.url("/limited")).send().await.unwrap();
  assert_eq!(limited.status(), 504);
  tokio::task::block_in_place(|| outpost.wait_for_log("aborted /limited: AbortError"));
  // Answered: never aborted.
  assert_eq!(outpost.get_text("/answered").await, "ok");
  let logs = tokio::task::block_in_place(|| outpost.wait_for_log("answered: aborted="));
  assert!(logs.contains("answered: aborted=false"), "{logs}");
  assert!(!logs.contains("aborted /answered"), "{logs}");
}

/// A bundle that ships its own source map (`//# sourceMappingURL=bundle.js.map`, as esbuild
/// writes it) gets stacks that point at its original TypeScript file, line and column; a map
/// named outside the function's directory is not read.
#[tokio::test]
async fn a_bundles_own_source_map_points_stacks_at_the_original_typescript() {
  let source = "interface Order { id: number }\n\nexport function check(order: Order): number {\n  if (order.id < 0) throw new Error(\"bad order \" + order.id);\n  return order.id;\n}\n\nexport default {\n  fetch: (): Response => new Response(String(check({ id: -7 }))),\n};\n";
  let specifier = deno_ast::ModuleSpecifier::parse("file:///src/app.ts").unwrap();
  let emitted = deno_ast::parse_module(deno_ast::ParseParams {
    specifier,
    text: source.into(),
    media_type: deno_ast::MediaType::TypeScript,
    capture_tokens: false,
    scope_analysis: false,
    maybe_syntax: None,
  })
  .unwrap()
  .transpile(
    &deno_ast::TranspileOptions::default(),
    &deno_ast::TranspileModuleOptions::default(),
    &deno_ast::EmitOptions {
      source_map: deno_ast::SourceMapOption::Separate,
      ..Default::default()
    },
  )
  .unwrap()
  .into_source();
  let bundle = format!("{}\n//# sourceMappingURL=bundle.js.map\n", emitted.text);
  let outside = format!("{}\n//# sourceMappingURL=../bundle.js.map\n", emitted.text);
  let map = emitted.source_map.unwrap().into_bytes();
  let outpost = Outpost::start_with(
    &functions_config(
      "[server]\nerror_details = true",
      &[
        ("bundled", "fn/bundle.js", r#"routes = ["/bundled"]"#),
        ("outside", "other/bundle.js", r#"routes = ["/outside"]"#),
      ],
    ),
    &[("fn/bundle.js", &bundle), ("other/bundle.js", &outside)],
    |dir| {
      std::fs::write(dir.join("fn/bundle.js.map"), &map).unwrap();
      std::fs::write(dir.join("bundle.js.map"), &map).unwrap();
    },
  );
  let client = http1();
  let body = client.get(outpost.url("/bundled")).text_of().await;
  assert!(body.contains("bad order -7"), "{body}");
  assert!(
    body.contains("file:///src/app.ts:4:"),
    "the stack names the .ts line:\n{body}"
  );
  let body = client.get(outpost.url("/outside")).text_of().await;
  assert!(body.contains("bad order -7"), "{body}");
  assert!(
    !body.contains("app.ts") && body.contains("bundle.js:"),
    "a map outside the function's directory is not read:\n{body}"
  );
}
