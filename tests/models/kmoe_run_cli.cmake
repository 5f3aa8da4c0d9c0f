# SPDX-License-Identifier: BSD-3-Clause
# Runs kmoe-run on the Mixtral fixture: --help exits 0, bad arguments exit 2 with a usage
# error, a forward + backward run exits 0 and writes both files.
# Invoked by ctest with -DKMOE_RUN=<binary> -DFIXTURE=<fixture dir> -DWORK=<scratch dir>.
file(REMOVE_RECURSE ${WORK})
file(MAKE_DIRECTORY ${WORK})

function(expect_exit code)
  execute_process(COMMAND ${KMOE_RUN} ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out
                  ERROR_VARIABLE err)
  if(NOT rc STREQUAL "${code}")
    message(FATAL_ERROR "kmoe-run ${ARGN}: exit ${rc}, expected ${code}\n${out}\n${err}")
  endif()
  set(last_out "${out}" PARENT_SCOPE)
  set(last_err "${err}" PARENT_SCOPE)
endfunction()

expect_exit(0 --help)
if(NOT last_out MATCHES "--grad-output")
  message(FATAL_ERROR "--help does not document --grad-output:\n${last_out}")
endif()

expect_exit(2 --model ${FIXTURE}/model --layer 1)
if(NOT last_err MATCHES "--input is required")
  message(FATAL_ERROR "missing --input not reported:\n${last_err}")
endif()
expect_exit(2 --model ${FIXTURE}/model --layer one --input x --output y)
expect_exit(2 --frobnicate)
expect_exit(2 --model ${FIXTURE}/model --layer 1 --input x --output y --grads g)

# A failing run (missing input file) is a runtime error, not a usage error.
expect_exit(1 --model ${FIXTURE}/model --layer 1 --input ${WORK}/missing.safetensors
            --output ${WORK}/y.safetensors)

expect_exit(0 --model ${FIXTURE}/model --layer 1 --input ${FIXTURE}/input.safetensors
            --output ${WORK}/output.safetensors --grad-output ${FIXTURE}/grad_output.safetensors
            --grads ${WORK}/grads.safetensors --threads 2 --bench --repeats 3)
foreach(f output.safetensors grads.safetensors)
  if(NOT EXISTS ${WORK}/${f})
    message(FATAL_ERROR "kmoe-run did not write ${f}")
  endif()
endforeach()
if(NOT last_out MATCHES "forward: median")
  message(FATAL_ERROR "--bench printed no timing:\n${last_out}")
endif()
