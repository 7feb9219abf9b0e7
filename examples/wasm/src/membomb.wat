;; membomb (adversarial): grows linear memory one page at a time, touching each
;; new page so the host really backs it, until memory.grow reports failure;
;; then it traps. The store's memory limit must stop it.
(module
  (memory (export "memory") 1)
  (func (export "_start")
    (local $prev i32)
    (loop $more
      (local.set $prev (memory.grow (i32.const 1)))
      (if (i32.eq (local.get $prev) (i32.const -1)) (then unreachable))
      ;; write one byte into the new page
      (i32.store8 (i32.mul (local.get $prev) (i32.const 65536)) (i32.const 1))
      (br $more))))
