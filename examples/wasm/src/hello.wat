;; hello: the smallest WASI command. Prints one line to stdout and exits 0.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  ;; iovec {base=16, len=20} at 0; nwritten at 8; the text at 16.
  (data (i32.const 0) "\10\00\00\00\14\00\00\00")
  (data (i32.const 16) "hello from p2psched\n")
  (func (export "_start")
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
