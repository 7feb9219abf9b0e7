;; openfile (adversarial): asks WASI for its preopened directories, then tries
;; path_open("/etc/passwd") the way wasi-libc would (relative to the first
;; preopen, fd 3). With no preopens both must fail. It prints what happened and
;; exits 0 when the open was refused, 1 if it succeeded.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_prestat_get"
    (func $fd_prestat_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 256) "etc/passwd")                        ;; 10 bytes
  (data (i32.const 300) "preopens: none\n")                   ;; 15 bytes
  (data (i32.const 320) "preopens: present\n")                ;; 18 bytes
  (data (i32.const 340) "open /etc/passwd: denied, errno ")  ;; 32 bytes
  (data (i32.const 380) "open /etc/passwd: OPENED\n")         ;; 25 bytes

  (func $write (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))))

  ;; writes n (0..999) in decimal and a newline
  (func $write_num (param $n i32)
    (local $p i32)
    (local.set $p (i32.const 420))
    (if (i32.ge_u (local.get $n) (i32.const 100)) (then
      (i32.store8 (local.get $p) (i32.add (i32.const 48) (i32.div_u (local.get $n) (i32.const 100))))
      (local.set $p (i32.add (local.get $p) (i32.const 1)))))
    (if (i32.ge_u (local.get $n) (i32.const 10)) (then
      (i32.store8 (local.get $p) (i32.add (i32.const 48) (i32.rem_u (i32.div_u (local.get $n) (i32.const 10)) (i32.const 10))))
      (local.set $p (i32.add (local.get $p) (i32.const 1)))))
    (i32.store8 (local.get $p) (i32.add (i32.const 48) (i32.rem_u (local.get $n) (i32.const 10))))
    (i32.store8 (i32.add (local.get $p) (i32.const 1)) (i32.const 10))
    (call $write (i32.const 420) (i32.sub (i32.add (local.get $p) (i32.const 2)) (i32.const 420))))

  (func (export "_start")
    (local $err i32)
    (if (call $fd_prestat_get (i32.const 3) (i32.const 64))
      (then (call $write (i32.const 300) (i32.const 15)))
      (else (call $write (i32.const 320) (i32.const 18))))
    ;; path_open(dirfd=3, dirflags=0, path, len, oflags=0, rights: the defined bits, fdflags=0, &fd at 96)
    (local.set $err (call $path_open (i32.const 3) (i32.const 0) (i32.const 256) (i32.const 10)
                      (i32.const 0) (i64.const 0x1fffffff) (i64.const 0x1fffffff) (i32.const 0) (i32.const 96)))
    (if (local.get $err)
      (then
        (call $write (i32.const 340) (i32.const 32))
        (call $write_num (local.get $err))
        (call $proc_exit (i32.const 0)))
      (else
        (call $write (i32.const 380) (i32.const 25))
        (call $proc_exit (i32.const 1))))))
