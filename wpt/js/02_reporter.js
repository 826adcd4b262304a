// Runs after resources/testharness.js: records every subtest result and the harness status
// for the runner (`__wpt`), and defines the two assertions older test files still call but
// the current harness dropped (`assert_throws`, `promise_rejects`), with their old meaning.
"use strict";
(() => {
  const subtests = [];
  let finish;
  const finished = new Promise((resolve) => finish = resolve);
  add_result_callback((test) => {
    subtests.push({ name: test.name, status: test.status, message: test.message ?? null });
  });
  add_completion_callback((_tests, harness) => {
    finish({ status: harness.status, message: harness.message ?? null });
  });
  Object.defineProperty(globalThis, "__wpt", {
    value: { subtests, finished },
    configurable: true,
    enumerable: false,
  });

  // Old `assert_throws(code, func, description)`: `code` is a DOMException name or legacy
  // code (string or number), or an object whose `name` the thrown error's name must equal.
  function assert_throws(code, func, description) {
    if (typeof code === "string" || typeof code === "number") {
      return assert_throws_dom(code, func, description);
    }
    try {
      func();
    } catch (error) {
      assert_equals(error?.name, code.name, `${description}: the error's name`);
      return;
    }
    assert_unreached(`${description}: ${func} did not throw`);
  }

  // Old `promise_rejects(test, code, promise, description)`.
  function promise_rejects(test, code, promise, description) {
    return promise.then(
      test.unreached_func(`${description}: should have rejected`),
      (error) => assert_throws(code, () => { throw error; }, description),
    );
  }

  Object.assign(globalThis, { assert_throws, promise_rejects });
})();
