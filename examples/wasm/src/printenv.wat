;; printenv: prints each argument as "arg: A" and each environment variable as
;; "env: K=V", one per line. Shows exactly what a job's guest can see.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get"
    (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get"
    (func $args_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get"
    (func $environ_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get"
    (func $environ_get (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 128) "arg: ")
  (data (i32.const 136) "env: ")
  (data (i32.const 144) "\n")

  (func $write (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))))

  (func $strlen (param $p i32) (result i32)
    (local $q i32)
    (local.set $q (local.get $p))
    (block $end (loop $next
      (br_if $end (i32.eqz (i32.load8_u (local.get $q))))
      (local.set $q (i32.add (local.get $q) (i32.const 1)))
      (br $next)))
    (i32.sub (local.get $q) (local.get $p)))

  ;; make sure memory reaches `end` bytes
  (func $reserve (param $end i32)
    (local $have i32)
    (local.set $have (i32.mul (memory.size) (i32.const 65536)))
    (if (i32.gt_u (local.get $end) (local.get $have)) (then
      (if (i32.eq (memory.grow (i32.div_u (i32.add (i32.sub (local.get $end) (local.get $have)) (i32.const 65535)) (i32.const 65536)))
                  (i32.const -1))
        (then unreachable)))))

  ;; print `count` strings whose pointers start at `ptrs`, each after `prefix`
  (func $print_all (param $ptrs i32) (param $count i32) (param $prefix i32)
    (local $i i32) (local $s i32)
    (block $end (loop $next
      (br_if $end (i32.ge_u (local.get $i) (local.get $count)))
      (local.set $s (i32.load (i32.add (local.get $ptrs) (i32.mul (local.get $i) (i32.const 4)))))
      (call $write (local.get $prefix) (i32.const 5))
      (call $write (local.get $s) (call $strlen (local.get $s)))
      (call $write (i32.const 144) (i32.const 1))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $next))))

  (func (export "_start")
    (local $n i32) (local $size i32) (local $ptrs i32) (local $buf i32)
    ;; arguments: pointer array at 4096, then the strings
    (drop (call $args_sizes_get (i32.const 16) (i32.const 20)))
    (local.set $n (i32.load (i32.const 16)))
    (local.set $size (i32.load (i32.const 20)))
    (local.set $ptrs (i32.const 4096))
    (local.set $buf (i32.add (local.get $ptrs) (i32.mul (local.get $n) (i32.const 4))))
    (call $reserve (i32.add (local.get $buf) (local.get $size)))
    (drop (call $args_get (local.get $ptrs) (local.get $buf)))
    (call $print_all (local.get $ptrs) (local.get $n) (i32.const 128))
    ;; environment: after the arguments
    (local.set $ptrs (i32.and (i32.add (i32.add (local.get $buf) (local.get $size)) (i32.const 7)) (i32.const -8)))
    (drop (call $environ_sizes_get (i32.const 16) (i32.const 20)))
    (local.set $n (i32.load (i32.const 16)))
    (local.set $size (i32.load (i32.const 20)))
    (local.set $buf (i32.add (local.get $ptrs) (i32.mul (local.get $n) (i32.const 4))))
    (call $reserve (i32.add (local.get $buf) (local.get $size)))
    (drop (call $environ_get (local.get $ptrs) (local.get $buf)))
    (call $print_all (local.get $ptrs) (local.get $n) (i32.const 136))))
