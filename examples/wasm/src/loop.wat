;; loop (adversarial): spins forever without touching memory. Only fuel or the
;; wall-clock deadline stops it.
(module
  (func (export "_start") (loop $forever (br $forever))))
