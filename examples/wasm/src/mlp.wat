;; mlp: inference of a two-layer perceptron, logits = W2 . relu(W1 . x + b1) + b2.
;;
;; stdin, all little-endian:
;;   u32 n_in, u32 n_hidden, u32 n_out
;;   f32 W1[n_hidden][n_in]   (row-major: row j holds hidden unit j's weights)
;;   f32 b1[n_hidden]
;;   f32 W2[n_out][n_hidden]
;;   f32 b2[n_out]
;;   f32 X[batch][n_in]       (one or more input rows; batch = what is left / n_in)
;; stdout: f32 logits[batch][n_out].
;; Each dot product starts from the bias and adds w*x terms in index order, in
;; float32, so a reference that rounds the same way reproduces the bits exactly
;; (examples/wasm/guest_io.py has one). Malformed input: a message on stderr, exit 1.
(module
  (import "wasi_snapshot_preview1" "fd_read"
    (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 256) "mlp: input must be u32 n_in, n_hidden, n_out (each >= 1), then float32 W1, b1, W2, b2 and one or more rows of n_in inputs\n")

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

  (func $write_all (param $fd i32) (param $ptr i32) (param $len i32)
    (block $done (loop $more
      (br_if $done (i32.eqz (local.get $len)))
      (i32.store (i32.const 16) (local.get $ptr))
      (i32.store (i32.const 20) (local.get $len))
      (if (call $fd_write (local.get $fd) (i32.const 16) (i32.const 1) (i32.const 24)) (then unreachable))
      (local.set $ptr (i32.add (local.get $ptr) (i32.load (i32.const 24))))
      (local.set $len (i32.sub (local.get $len) (i32.load (i32.const 24))))
      (br $more))))

  (func $reserve (param $end i32)
    (local $have i32)
    (local.set $have (i32.mul (memory.size) (i32.const 65536)))
    (if (i32.gt_u (local.get $end) (local.get $have)) (then
      (if (i32.eq (memory.grow (i32.div_u (i32.add (i32.sub (local.get $end) (local.get $have)) (i32.const 65535)) (i32.const 65536)))
                  (i32.const -1))
        (then unreachable)))))

  (func $refuse
    (call $write_all (i32.const 2) (i32.const 256) (i32.const 122))
    (call $proc_exit (i32.const 1)))

  ;; init + sum_k w[k]*x[k], in float32, in index order
  (func $dot (param $w i32) (param $x i32) (param $n i32) (param $acc f32) (result f32)
    (local $k i32)
    (block $done (loop $next
      (br_if $done (i32.ge_u (local.get $k) (local.get $n)))
      (local.set $acc (f32.add (local.get $acc)
        (f32.mul (f32.load (i32.add (local.get $w) (i32.shl (local.get $k) (i32.const 2))))
                 (f32.load (i32.add (local.get $x) (i32.shl (local.get $k) (i32.const 2)))))))
      (local.set $k (i32.add (local.get $k) (i32.const 1)))
      (br $next)))
    (local.get $acc))

  (func (export "_start")
    (local $base i32) (local $len i32)
    (local $nin i32) (local $nh i32) (local $no i32)
    (local $nweights i64) (local $nfloats i64) (local $rest i64) (local $batch i32)
    (local $w1 i32) (local $b1 i32) (local $w2 i32) (local $b2 i32) (local $x i32)
    (local $hid i32) (local $out i32) (local $r i32) (local $j i32) (local $i i32)
    (local.set $base (i32.const 4096))
    (local.set $len (call $read_all (local.get $base)))
    (if (i32.lt_u (local.get $len) (i32.const 12)) (then (call $refuse)))
    (if (i32.rem_u (local.get $len) (i32.const 4)) (then (call $refuse)))
    (local.set $nin (i32.load (local.get $base)))
    (local.set $nh (i32.load (i32.add (local.get $base) (i32.const 4))))
    (local.set $no (i32.load (i32.add (local.get $base) (i32.const 8))))
    (if (i32.or (i32.or (i32.eqz (local.get $nin)) (i32.eqz (local.get $nh))) (i32.eqz (local.get $no)))
      (then (call $refuse)))
    ;; counts in i64 so that a hostile header cannot wrap around
    (local.set $nweights (i64.add
      (i64.mul (i64.extend_i32_u (local.get $nh)) (i64.add (i64.extend_i32_u (local.get $nin)) (i64.const 1)))
      (i64.mul (i64.extend_i32_u (local.get $no)) (i64.add (i64.extend_i32_u (local.get $nh)) (i64.const 1)))))
    (local.set $nfloats (i64.extend_i32_u (i32.div_u (i32.sub (local.get $len) (i32.const 12)) (i32.const 4))))
    (if (i64.le_u (local.get $nfloats) (local.get $nweights)) (then (call $refuse)))
    (local.set $rest (i64.sub (local.get $nfloats) (local.get $nweights)))
    (if (i64.ne (i64.rem_u (local.get $rest) (i64.extend_i32_u (local.get $nin))) (i64.const 0))
      (then (call $refuse)))
    (local.set $batch (i32.wrap_i64 (i64.div_u (local.get $rest) (i64.extend_i32_u (local.get $nin)))))
    (local.set $w1 (i32.add (local.get $base) (i32.const 12)))
    (local.set $b1 (i32.add (local.get $w1) (i32.shl (i32.mul (local.get $nh) (local.get $nin)) (i32.const 2))))
    (local.set $w2 (i32.add (local.get $b1) (i32.shl (local.get $nh) (i32.const 2))))
    (local.set $b2 (i32.add (local.get $w2) (i32.shl (i32.mul (local.get $no) (local.get $nh)) (i32.const 2))))
    (local.set $x (i32.add (local.get $b2) (i32.shl (local.get $no) (i32.const 2))))
    (local.set $hid (i32.add (local.get $base) (local.get $len)))
    (local.set $out (i32.add (local.get $hid) (i32.shl (local.get $nh) (i32.const 2))))
    (call $reserve (i32.add (local.get $out) (i32.shl (i32.mul (local.get $batch) (local.get $no)) (i32.const 2))))
    (block $rows_done (loop $row
      (br_if $rows_done (i32.ge_u (local.get $r) (local.get $batch)))
      ;; hidden layer
      (local.set $j (i32.const 0))
      (block $h_done (loop $h
        (br_if $h_done (i32.ge_u (local.get $j) (local.get $nh)))
        (f32.store (i32.add (local.get $hid) (i32.shl (local.get $j) (i32.const 2)))
          (f32.max (f32.const 0)
            (call $dot
              (i32.add (local.get $w1) (i32.shl (i32.mul (local.get $j) (local.get $nin)) (i32.const 2)))
              (local.get $x) (local.get $nin)
              (f32.load (i32.add (local.get $b1) (i32.shl (local.get $j) (i32.const 2)))))))
        (local.set $j (i32.add (local.get $j) (i32.const 1)))
        (br $h)))
      ;; output layer
      (local.set $i (i32.const 0))
      (block $o_done (loop $o
        (br_if $o_done (i32.ge_u (local.get $i) (local.get $no)))
        (f32.store (i32.add (local.get $out) (i32.shl (i32.add (i32.mul (local.get $r) (local.get $no)) (local.get $i)) (i32.const 2)))
          (call $dot
            (i32.add (local.get $w2) (i32.shl (i32.mul (local.get $i) (local.get $nh)) (i32.const 2)))
            (local.get $hid) (local.get $nh)
            (f32.load (i32.add (local.get $b2) (i32.shl (local.get $i) (i32.const 2))))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $o)))
      (local.set $x (i32.add (local.get $x) (i32.shl (local.get $nin) (i32.const 2))))
      (local.set $r (i32.add (local.get $r) (i32.const 1)))
      (br $row)))
    (call $write_all (i32.const 1) (local.get $out) (i32.shl (i32.mul (local.get $batch) (local.get $no)) (i32.const 2)))))
