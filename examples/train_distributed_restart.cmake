# SPDX-License-Identifier: BSD-3-Clause
# ctest example_train_distributed_restart, run with cmake -P: a training job killed on 4
# ranks continues on 2 from its last checkpoint as if it had never stopped.
#   1. train_distributed on 4 ranks (EP2 x DP2), 40 steps, checkpoints every 10;
#   2. the same job killed on purpose after the forward of step 29: it must fail, leave its
#      step-20 checkpoint and no complete checkpoint of a later step;
#   3. --resume of that job on 2 ranks (EP2) to step 40, from step 20.
# Every step of 3 must print the loss of 1 within 1e-5 relative; the table of both goes to
# the log (ctest -V).
#
# Inputs (-D): TRAIN (the executable), MPIEXEC_EXECUTABLE, MPIEXEC_NUMPROC_FLAG,
# KMOE_MPIEXEC_EXTRA_FLAGS (space-separated), WORK_DIR (emptied first); optional
# KILLED_FLAGS and RESTART_FLAGS (space-separated), more arguments of runs 2 and 3 (e.g.
# "--zero 2": sharded optimizer state, compared with the unsharded run 1).
cmake_minimum_required(VERSION 3.21)  # string(JSON)

foreach(input TRAIN MPIEXEC_EXECUTABLE MPIEXEC_NUMPROC_FLAG WORK_DIR)
  if(NOT DEFINED ${input})
    message(FATAL_ERROR "train_distributed_restart.cmake: -D${input}=... is required")
  endif()
endforeach()
separate_arguments(mpiexec_extra UNIX_COMMAND "${KMOE_MPIEXEC_EXTRA_FLAGS}")
separate_arguments(killed_flags UNIX_COMMAND "${KILLED_FLAGS}")
separate_arguments(restart_flags UNIX_COMMAND "${RESTART_FLAGS}")

set(steps 40)
set(every 10)
set(kill_step 29)
math(EXPR restart_step "${kill_step} / ${every} * ${every}")  # the last checkpoint before it
math(EXPR last_step "${steps} - 1")
file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")

# Runs train_distributed on `ranks` ranks with the remaining arguments; sets <name>_rc and
# <name>_output (stdout, also written to WORK_DIR/<name>.txt) in the caller.
function(train name ranks)
  set(command ${MPIEXEC_EXECUTABLE} ${MPIEXEC_NUMPROC_FLAG} ${ranks} ${mpiexec_extra} ${TRAIN} ${ARGN})
  string(REPLACE ";" " " shown "${command}")
  message("-- ${name}: ${shown}")
  execute_process(COMMAND ${command} OUTPUT_VARIABLE output ERROR_VARIABLE errors RESULT_VARIABLE rc)
  file(WRITE "${WORK_DIR}/${name}.txt" "${output}")
  file(WRITE "${WORK_DIR}/${name}.stderr.txt" "${errors}")
  message("   exit status ${rc}")
  set(${name}_rc "${rc}" PARENT_SCOPE)
  set(${name}_output "${output}" PARENT_SCOPE)
endfunction()

# Sets loss_<prefix>_<n> to the loss printed for each step n of `output`, and <prefix>_steps
# to the list of those steps in the order printed.
function(parse_losses prefix output)
  string(REGEX MATCHALL "step [0-9]+ loss [^\n]+" lines "${output}")
  set(found "")
  foreach(line IN LISTS lines)
    string(REGEX MATCH "^step ([0-9]+) loss (.+)$" _ "${line}")
    set(loss_${prefix}_${CMAKE_MATCH_1} "${CMAKE_MATCH_2}" PARENT_SCOPE)
    list(APPEND found ${CMAKE_MATCH_1})
  endforeach()
  set(${prefix}_steps "${found}" PARENT_SCOPE)
endfunction()

# CMake has integer arithmetic only: a loss printed with %.9g becomes <out>_digits, 9
# digits, and <out>_exponent, so that the value is digits x 10^(exponent - 8).
function(decimal_of value out)
  if(NOT value MATCHES "^([0-9]+)(\\.([0-9]+))?(e([-+])0*([0-9]+))?$")
    message(FATAL_ERROR "'${value}' is not a non-negative number printed with %.9g")
  endif()
  set(digits "${CMAKE_MATCH_1}${CMAKE_MATCH_3}")
  string(LENGTH "${CMAKE_MATCH_3}" fraction_length)
  set(power 0)
  if(CMAKE_MATCH_6)
    set(power "${CMAKE_MATCH_6}")
    if(CMAKE_MATCH_5 STREQUAL "-")
      set(power "-${power}")
    endif()
  endif()
  math(EXPR power "${power} - ${fraction_length}")  # value = digits x 10^power
  string(REGEX REPLACE "^0+" "" digits "${digits}")
  if(digits STREQUAL "")
    set(${out}_digits 0 PARENT_SCOPE)
    set(${out}_exponent 0 PARENT_SCOPE)
    return()
  endif()
  string(LENGTH "${digits}" length)
  while(length LESS 9)
    string(APPEND digits 0)
    math(EXPR power "${power} - 1")
    math(EXPR length "${length} + 1")
  endwhile()
  math(EXPR exponent "${power} + 8")
  set(${out}_digits "${digits}" PARENT_SCOPE)
  set(${out}_exponent "${exponent}" PARENT_SCOPE)
endfunction()

# Sets <out>_ok (|b - a| <= 1e-5 |a|) and <out>_text (|b - a| / |a| to the resolution of
# 9 significant digits, or "> 1e-5").
function(relative_difference a b out)
  decimal_of("${a}" x)
  decimal_of("${b}" y)
  # Bring both to the smaller exponent (one decade apart at most when they agree).
  math(EXPR gap "${x_exponent} - ${y_exponent}")
  if(gap EQUAL 1)
    math(EXPR x_digits "${x_digits} * 10")
  elseif(gap EQUAL -1)
    math(EXPR y_digits "${y_digits} * 10")
  elseif(NOT gap EQUAL 0)
    set(x_digits 1)
    set(y_digits 1000000)  # any pair more than 1e-5 apart
  endif()
  math(EXPR difference "${y_digits} - ${x_digits}")
  if(difference LESS 0)
    math(EXPR difference "0 - ${difference}")
  endif()
  if(x_digits EQUAL 0)
    set(close FALSE)
    if(difference EQUAL 0)
      set(close TRUE)
    endif()
  else()
    math(EXPR scaled "${difference} * 100000")
    set(close FALSE)
    if(NOT scaled GREATER x_digits)
      set(close TRUE)
    endif()
  endif()
  if(close AND difference EQUAL 0)
    set(text "0")
  elseif(close)
    # In units of 1e-9 (below 10^4 here), printed as %.1e would (truncated).
    math(EXPR billionths "${difference} * 1000000000 / ${x_digits}")
    string(LENGTH "${billionths}" length)
    math(EXPR decade "10 - ${length}")
    string(SUBSTRING "${billionths}" 0 1 leading)
    if(length EQUAL 1)
      set(text "${leading}e-0${decade}")
    else()
      string(SUBSTRING "${billionths}" 1 1 second)
      set(text "${leading}.${second}e-0${decade}")
    endif()
  else()
    set(text "> 1e-5")
  endif()
  set(${out}_ok ${close} PARENT_SCOPE)
  set(${out}_text "${text}" PARENT_SCOPE)
endfunction()

# train_distributed's directory name for the checkpoint of `step`: step-<8 digits>.
function(checkpoint_name step out)
  set(name "${step}")
  string(LENGTH "${name}" length)
  while(length LESS 8)
    string(PREPEND name 0)
    math(EXPR length "${length} + 1")
  endwhile()
  set(${out} "step-${name}" PARENT_SCOPE)
endfunction()

function(pad text width out)
  string(LENGTH "${text}" length)
  while(length LESS width)
    string(APPEND text " ")
    math(EXPR length "${length} + 1")
  endwhile()
  set(${out} "${text}" PARENT_SCOPE)
endfunction()

set(failures "")

# 1. The uninterrupted run.
train(uninterrupted 4 --ep 2 --dp 2 --steps ${steps}
      --checkpoint-dir "${WORK_DIR}/uninterrupted" --checkpoint-every ${every})
if(NOT uninterrupted_rc EQUAL 0)
  message(FATAL_ERROR "the uninterrupted run failed (exit status ${uninterrupted_rc}); "
                      "see ${WORK_DIR}/uninterrupted.stderr.txt")
endif()
parse_losses(uninterrupted "${uninterrupted_output}")

# 2. The same job, killed.
set(checkpoints "${WORK_DIR}/killed")
train(killed 4 --ep 2 --dp 2 --steps ${steps}
      --checkpoint-dir "${checkpoints}" --checkpoint-every ${every} --kill-at-step ${kill_step}
      ${killed_flags})
if(killed_rc EQUAL 0)
  list(APPEND failures "the run told to die at step ${kill_step} exited with status 0")
endif()
math(EXPR before_kill "${kill_step} - 1")
if(NOT killed_output MATCHES "(^|\n)step ${before_kill} loss " OR
   killed_output MATCHES "(^|\n)step ${kill_step} loss ")
  list(APPEND failures "the killed run did not stop at step ${kill_step} (its last loss line must be step ${before_kill})")
endif()
checkpoint_name(${restart_step} restart_checkpoint)
set(expected_index "${checkpoints}/${restart_checkpoint}/index.json")
if(NOT EXISTS "${expected_index}")
  list(APPEND failures "the killed run left no complete checkpoint ${expected_index}")
endif()
file(GLOB indexes "${checkpoints}/*/index.json")
foreach(index IN LISTS indexes)
  file(READ "${index}" text)
  string(JSON saved_step GET "${text}" step)
  if(saved_step GREATER restart_step)
    list(APPEND failures "the killed run left a complete checkpoint of step ${saved_step} (${index})")
  endif()
endforeach()

# 3. The restart on 2 ranks from the killed run's latest checkpoint.
train(restarted 2 --ep 2 --steps ${steps}
      --checkpoint-dir "${checkpoints}" --checkpoint-every ${every} --resume ${restart_flags})
if(NOT restarted_rc EQUAL 0)
  list(APPEND failures "the restart failed (exit status ${restarted_rc}); see ${WORK_DIR}/restarted.stderr.txt")
endif()
if(NOT restarted_output MATCHES "resumed from [^\n]*${restart_checkpoint} at step ${restart_step} ")
  list(APPEND failures "the restart did not resume from the step-${restart_step} checkpoint")
endif()
parse_losses(restarted "${restarted_output}")
set(expected_steps "")
foreach(step RANGE ${restart_step} ${last_step})
  list(APPEND expected_steps ${step})
endforeach()
if(NOT restarted_steps STREQUAL expected_steps)
  string(REPLACE ";" " " printed "${restarted_steps}")
  list(APPEND failures "the restart printed steps '${printed}', expected ${restart_step} to ${last_step}")
endif()

# The comparison, as a Markdown table.
set(table "| step | uninterrupted: 4 ranks EP2 x DP2 | killed at ${kill_step}, restarted on 2 ranks EP2 | relative difference |\n")
string(APPEND table "|---|---|---|---|\n")
foreach(step RANGE ${restart_step} ${last_step})
  set(a "${loss_uninterrupted_${step}}")
  set(b "${loss_restarted_${step}}")
  if(a STREQUAL "")
    set(compared_text "missing")
    list(APPEND failures "step ${step}: no loss line in the uninterrupted run")
  elseif(b STREQUAL "")
    set(compared_text "missing")
    list(APPEND failures "step ${step}: no loss line after the restart")
  else()
    relative_difference("${a}" "${b}" compared)
    if(NOT compared_ok)
      list(APPEND failures "step ${step}: loss ${b} after the restart, ${a} uninterrupted")
    endif()
  endif()
  pad("${step}" 4 step_cell)
  pad("${a}" 32 a_cell)
  pad("${b}" 47 b_cell)
  string(APPEND table "| ${step_cell} | ${a_cell} | ${b_cell} | ${compared_text} |\n")
endforeach()
message("${table}")

if(failures)
  string(REPLACE ";" "\n  " listed "${failures}")
  message(FATAL_ERROR "train_distributed restart:\n  ${listed}")
endif()
message("all ${restart_step}..${last_step} losses after the restart within 1e-5 of the uninterrupted run")
