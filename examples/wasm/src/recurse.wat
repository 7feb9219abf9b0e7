;; recurse (adversarial): unbounded non-tail recursion. The stack limit must
;; stop it with a stack overflow rather than crash the host.
(module
  (func $down (param $n i64) (result i64)
    (i64.add (call $down (i64.add (local.get $n) (i64.const 1))) (local.get $n)))
  (func (export "_start") (drop (call $down (i64.const 0)))))
