# SPDX-License-Identifier: BSD-3-Clause
# Installs kmoe from KMOE_BINARY_DIR, then builds and runs tests/consumer twice: against the
# installed package (find_package) and as a subdirectory (add_subdirectory).
file(REMOVE_RECURSE ${WORK_DIR})
function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "failed: ${ARGN}\n${out}\n${err}")
  endif()
  message(STATUS "${out}")
endfunction()
run(${CMAKE_COMMAND} --install ${KMOE_BINARY_DIR} --prefix ${WORK_DIR}/install)
set(common -G ${GENERATOR} -DCMAKE_BUILD_TYPE=Release -DKokkos_DIR=${Kokkos_DIR}
    -DKokkosKernels_DIR=${KokkosKernels_DIR})
find_program(CCACHE ccache)
if(CCACHE)
  list(APPEND common -DCMAKE_CXX_COMPILER_LAUNCHER=${CCACHE})
endif()
foreach(mode package subdirectory)
  run(${CMAKE_COMMAND} -S ${KMOE_SOURCE_DIR}/tests/consumer -B ${WORK_DIR}/${mode} ${common}
      -DKMOE_CONSUMER_MODE=${mode} -DKMOE_SOURCE_DIR=${KMOE_SOURCE_DIR}
      -DCMAKE_PREFIX_PATH=${WORK_DIR}/install)
  run(${CMAKE_COMMAND} --build ${WORK_DIR}/${mode})
  run(${WORK_DIR}/${mode}/consumer)
endforeach()
