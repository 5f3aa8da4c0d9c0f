# SPDX-License-Identifier: BSD-3-Clause
# Issue 19 item 5: kmoe-plan's layout model predicts exactly the bytes ep_bench's forward
# sends. Runs ep_bench --json (pure expert parallelism: EP = ranks, the only layout it runs)
# at 2 and 4 ranks over several token counts, expert counts and exchange paths (unchunked
# flat with the counts in the header, pipelined with a count all-to-all, hierarchical), and
# checks on every rank:
#  - the rows (dispatch payload + combine) and the metadata (header + counts) ep_bench
#    reports per peer, summed over the other ranks, equal the model's prediction from the
#    gathered routing tables (model_rows_bytes, model_metadata_bytes);
#  - on the flat route, the bytes the exchange handed the communicators (traffic_bytes,
#    ForwardStats::traffic, counted by the route per message) equal the model's total.
# Invoked as: cmake -DMPIEXEC=... -DNP_FLAG=-n -DEXTRA="..." -DBENCH=ep_bench -P this
cmake_minimum_required(VERSION 3.19)  # string(JSON)
foreach(var MPIEXEC NP_FLAG BENCH)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "ep_bench_model.cmake: -D${var}=... is required")
  endif()
endforeach()
separate_arguments(extra UNIX_COMMAND "${EXTRA}")

set(common --hidden 32 --ffn 32 --shared-ffn 32 --repeats 1 --exchange-only --json)
# name | ranks | arguments (separated by commas)
set(runs
    "np2_T32_E8|2|--tokens,32,--experts,8"
    "np2_T48_E4_C1|2|--tokens,48,--experts,4,--chunks,1"
    "np2_T40_E6_C2|2|--tokens,40,--experts,6,--chunks,2"
    "np4_T32_E8|4|--tokens,32,--experts,8"
    "np4_T24_E4_C1|4|--tokens,24,--experts,4,--chunks,1"
    "np4_T56_E12_C3|4|--tokens,56,--experts,12,--chunks,3"
    "np4_T32_E8_hierarchical|4|--tokens,32,--experts,8,--exchange,hierarchical,--ranks-per-node,2")

# Sum of a JSON list's entries except index `skip`.
function(sum_except json key skip out)
  string(JSON n LENGTH "${json}" ${key})
  set(total 0)
  math(EXPR last "${n} - 1")
  foreach(i RANGE ${last})
    if(NOT i EQUAL skip)
      string(JSON v GET "${json}" ${key} ${i})
      math(EXPR total "${total} + ${v}")
    endif()
  endforeach()
  set(${out} ${total} PARENT_SCOPE)
endfunction()

set(failures 0)
set(checked 0)
foreach(run IN LISTS runs)
  string(REPLACE "|" ";" fields "${run}")
  list(GET fields 0 name)
  list(GET fields 1 ranks)
  list(GET fields 2 args)
  string(REPLACE "," ";" args "${args}")
  execute_process(
    COMMAND ${MPIEXEC} ${NP_FLAG} ${ranks} ${extra} ${BENCH} ${common} ${args}
    OUTPUT_VARIABLE output ERROR_VARIABLE errors RESULT_VARIABLE status TIMEOUT 120)
  if(NOT status EQUAL 0)
    message(SEND_ERROR "${name}: ep_bench exited with ${status}\n${output}\n${errors}")
    math(EXPR failures "${failures} + 1")
    continue()
  endif()
  string(REGEX MATCHALL "{\"bench\":\"ep_bench\"[^\n]*}" lines "${output}")
  list(LENGTH lines count)
  if(NOT count EQUAL ranks)
    message(SEND_ERROR "${name}: ${count} JSON lines from ${ranks} ranks\n${output}")
    math(EXPR failures "${failures} + 1")
    continue()
  endif()
  foreach(line IN LISTS lines)
    string(JSON rank GET "${line}" rank)
    string(JSON exchange GET "${line}" exchange)
    string(JSON chunks GET "${line}" chunks)
    sum_except("${line}" dispatch_payload_bytes ${rank} payload)
    sum_except("${line}" combine_bytes ${rank} combine)
    sum_except("${line}" dispatch_header_bytes ${rank} header)
    sum_except("${line}" counts_bytes ${rank} counts)
    string(JSON model_rows GET "${line}" model_rows_bytes)
    string(JSON model_metadata GET "${line}" model_metadata_bytes)
    string(JSON traffic GET "${line}" traffic_bytes)
    math(EXPR rows "${payload} + ${combine}")
    math(EXPR metadata "${header} + ${counts}")
    math(EXPR model_total "${model_rows} + ${model_metadata}")
    set(what "${name} rank ${rank} (${exchange}, ${chunks} chunks)")
    if(NOT rows EQUAL model_rows OR NOT metadata EQUAL model_metadata)
      message(SEND_ERROR "${what}: ep_bench rows ${rows} metadata ${metadata} bytes, model "
                         "${model_rows} and ${model_metadata}")
      math(EXPR failures "${failures} + 1")
    elseif(exchange STREQUAL "flat" AND NOT traffic EQUAL model_total)
      message(SEND_ERROR "${what}: the exchange handed the communicators ${traffic} bytes, "
                         "the model predicts ${model_total}")
      math(EXPR failures "${failures} + 1")
    else()
      message(STATUS "${what}: rows ${rows}, metadata ${metadata}, on the wire ${traffic} bytes: "
                     "as predicted")
    endif()
    math(EXPR checked "${checked} + 1")
  endforeach()
endforeach()
if(failures GREATER 0)
  message(FATAL_ERROR "${failures} mismatches between ep_bench and the layout model")
endif()
message(STATUS "ep_bench's bytes equal the layout model's at ${checked} rank-runs")
