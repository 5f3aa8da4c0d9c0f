# SPDX-License-Identifier: BSD-3-Clause
# Runs PROBE with 1 and with 2 OpenMP threads and fails unless the outputs are identical.
foreach(threads 1 2)
  set(ENV{OMP_NUM_THREADS} ${threads})
  set(ENV{OMP_PROC_BIND} false)
  execute_process(COMMAND ${PROBE} OUTPUT_VARIABLE out_${threads} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "probe failed with ${threads} threads: ${rc}")
  endif()
endforeach()
message(STATUS "1 thread:\n${out_1}2 threads:\n${out_2}")
if(NOT out_1 STREQUAL out_2)
  message(FATAL_ERROR "results differ between 1 and 2 threads")
endif()
