;; sleep (adversarial): asks WASI to sleep for an hour through poll_oneoff, then
;; prints "woke". A blocking host call is beyond fuel and epoch checks, so the
;; sandbox's own poll_oneoff must cut the sleep short at the job's wall-clock
;; limit or when it is cancelled.
(module
  (import "wasi_snapshot_preview1" "poll_oneoff"
    (func $poll_oneoff (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 300) "woke\n")
  (func (export "_start")
    ;; one subscription at 0 (48 bytes): userdata 0, tag 0 = clock,
    ;; clock id 1 = monotonic at 16, relative timeout at 24: 3600 s in ns.
    (i32.store (i32.const 16) (i32.const 1))
    (i64.store (i32.const 24) (i64.const 3600000000000))
    ;; the event goes to 64, the event count to 200
    (drop (call $poll_oneoff (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 200)))
    ;; iovec {300, 5} at 208
    (i32.store (i32.const 208) (i32.const 300))
    (i32.store (i32.const 212) (i32.const 5))
    (drop (call $fd_write (i32.const 1) (i32.const 208) (i32.const 1) (i32.const 216)))))
