;; add: a module that exports one function and no `_start`; run it with
;; `--arg 2 --arg 40` and its result (42) is printed as the job's stdout.
(module
  (func (export "add") (param $a i64) (param $b i64) (result i64)
    (i64.add (local.get $a) (local.get $b))))
