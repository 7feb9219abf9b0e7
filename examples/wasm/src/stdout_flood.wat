;; stdout_flood (adversarial): writes 64 KiB blocks to stdout forever. The output
;; cap must truncate what is kept, and fuel or the deadline must end it.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (func (export "_start")
    ;; fill the block at 65536 with 'y'
    (memory.fill (i32.const 65536) (i32.const 121) (i32.const 65536))
    ;; iovec {base=65536, len=65536} at 0
    (i32.store (i32.const 0) (i32.const 65536))
    (i32.store (i32.const 4) (i32.const 65536))
    (loop $forever
      (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
      (br $forever))))
