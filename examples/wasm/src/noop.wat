;; noop: does nothing, as fast as possible. No imports and no memory, so a run
;; costs only instantiation and one call; the throughput benchmark measures the
;; scheduler's overhead with it. `_start` makes it a command, `noop` a function.
(module
  (func (export "_start"))
  (func (export "noop")))
