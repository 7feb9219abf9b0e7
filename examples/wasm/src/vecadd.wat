;; vecadd: reads two little-endian float32 vectors of equal length from stdin,
;; concatenated (a then b, 8*n bytes in all), and writes a+b as n little-endian
;; float32 to stdout. Input of a length that is not a multiple of 8 is refused
;; on stderr with exit status 1.
(module
  (import "wasi_snapshot_preview1" "fd_read"
    (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 256) "vecadd: input must be two float32 vectors of equal length (a multiple of 8 bytes)\n")

  ;; Reads all of stdin to `base`, growing memory as it goes; returns its length.
  (func $read_all (param $base i32) (result i32)
    (local $p i32) (local $n i32)
    (local.set $p (local.get $base))
    (block $done (loop $more
      (if (i32.gt_u (i32.add (local.get $p) (i32.const 65536))
                    (i32.mul (memory.size) (i32.const 65536)))
        (then (if (i32.eq (memory.grow (i32.const 1)) (i32.const -1)) (then unreachable))))
      (i32.store (i32.const 16) (local.get $p))
      (i32.store (i32.const 20) (i32.const 65536))
      (if (call $fd_read (i32.const 0) (i32.const 16) (i32.const 1) (i32.const 24)) (then unreachable))
      (local.set $n (i32.load (i32.const 24)))
      (br_if $done (i32.eqz (local.get $n)))
      (local.set $p (i32.add (local.get $p) (local.get $n)))
      (br $more)))
    (i32.sub (local.get $p) (local.get $base)))

  ;; Writes `len` bytes at `ptr` to `fd`, looping over short writes.
  (func $write_all (param $fd i32) (param $ptr i32) (param $len i32)
    (block $done (loop $more
      (br_if $done (i32.eqz (local.get $len)))
      (i32.store (i32.const 16) (local.get $ptr))
      (i32.store (i32.const 20) (local.get $len))
      (if (call $fd_write (local.get $fd) (i32.const 16) (i32.const 1) (i32.const 24)) (then unreachable))
      (local.set $ptr (i32.add (local.get $ptr) (i32.load (i32.const 24))))
      (local.set $len (i32.sub (local.get $len) (i32.load (i32.const 24))))
      (br $more))))

  (func (export "_start")
    (local $len i32) (local $n i32) (local $a i32) (local $b i32) (local $i i32)
    (local.set $a (i32.const 1024))
    (local.set $len (call $read_all (local.get $a)))
    (if (i32.rem_u (local.get $len) (i32.const 8)) (then
      (call $write_all (i32.const 2) (i32.const 256) (i32.const 82))
      (call $proc_exit (i32.const 1))))
    (local.set $n (i32.div_u (local.get $len) (i32.const 8)))
    (local.set $b (i32.add (local.get $a) (i32.mul (local.get $n) (i32.const 4))))
    ;; a[i] += b[i], in place
    (block $done (loop $next
      (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
      (f32.store (i32.add (local.get $a) (i32.shl (local.get $i) (i32.const 2)))
        (f32.add (f32.load (i32.add (local.get $a) (i32.shl (local.get $i) (i32.const 2))))
                 (f32.load (i32.add (local.get $b) (i32.shl (local.get $i) (i32.const 2))))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $next)))
    (call $write_all (i32.const 1) (local.get $a) (i32.mul (local.get $n) (i32.const 4)))))
