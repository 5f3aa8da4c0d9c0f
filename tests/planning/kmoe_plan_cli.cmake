# SPDX-License-Identifier: BSD-3-Clause
# kmoe-plan's command line: a plan ranks layouts and explains; bad input exits 1 naming the
# flag. Run by ctest kmoe_plan_cli with -DKMOE_PLAN=<path>.
set(shape --hidden 1024 --ffn 2048 --experts 16 --top-k 2 --tokens 8192)

# expect(<exit code> <regex> args...)
function(expect code regex)
  execute_process(COMMAND ${KMOE_PLAN} ${ARGN} RESULT_VARIABLE result OUTPUT_VARIABLE out
                  ERROR_VARIABLE err TIMEOUT 30)
  if(NOT result EQUAL code)
    message(FATAL_ERROR "kmoe-plan ${ARGN}: exit ${result}, expected ${code}\n${out}${err}")
  endif()
  if(NOT "${out}${err}" MATCHES "${regex}")
    message(FATAL_ERROR "kmoe-plan ${ARGN}: output does not match '${regex}':\n${out}${err}")
  endif()
endfunction()

# 16 experts on 8 ranks of one node: EP over every rank is the prior; the plan lists it.
expect(0 " 1[.] tp=.*memory .* GiB = weights.*prior: E = 16 experts on N = 8 ranks: experts are many"
       ${shape} --ranks 8 --ranks-per-node 8 --memory-per-rank 16)
expect(0 "tp=1 ep=8 dp=1" ${shape} --ranks 8 --ranks-per-node 8 --memory-per-rank 16 --top 40)
expect(0 "experts are few.*\\(tp=2 ep=16\\)" ${shape} --ranks 32 --ranks-per-node 8
       --memory-per-rank 16)
expect(1 "kmoe-plan: --ranks: must be >= 1, got 0" ${shape} --ranks 0 --memory-per-rank 16)
expect(1 "kmoe-plan: --ranks: 12 is not a multiple of --ranks-per-node 8" ${shape} --ranks 12
       --ranks-per-node 8 --memory-per-rank 16)
expect(1 "kmoe-plan: --memory-per-rank: 0.001 GiB is less than any layout needs \\(the least: "
       ${shape} --ranks 8 --memory-per-rank 0.001)
expect(1 "kmoe-plan: no layout of --ranks 4 is valid: excluded 1 by --ffn % TP != 0, 5 by --tokens % \\(EP x DP\\) != 0"
       --hidden 64 --ffn 30 --experts 8
       --top-k 2 --tokens 7 --ranks 4 --ranks-per-node 4 --memory-per-rank 1 --top 1)
expect(1 "kmoe-plan: --top-k: 17 exceeds --experts 16" --hidden 1024 --ffn 2048 --experts 16
       --top-k 17 --tokens 8192 --ranks 8 --memory-per-rank 16)
expect(1 "kmoe-plan: --memory-per-rank: required" ${shape} --ranks 8)
expect(1 "kmoe-plan: --hidden: 'x' is not an integer" --hidden x)
expect(1 "kmoe-plan: unknown argument '--rank'" ${shape} --rank 8)
