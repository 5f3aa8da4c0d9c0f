# SPDX-License-Identifier: BSD-3-Clause
# Runs kmoe-run on the fixtures: --help exits 0, bad arguments exit 2 with a usage error,
# and a forward + backward run on each fixture model exits 0 and writes outputs and gradients
# that equal HF transformers' (compared by COMPARE, tests/models/compare_safetensors.cpp).
# Invoked by ctest with -DKMOE_RUN=<binary> -DCOMPARE=<binary> -DFIXTURES=<tests/fixtures>
# -DWORK=<scratch dir>.
set(FIXTURE ${FIXTURES}/mixtral)
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

# expect_within(REFERENCE CANDIDATE TOLERANCE WHAT): compare_safetensors within TOLERANCE of
# the reference's scale (integers exact), or fail naming WHAT; prints the hidden states' line.
function(expect_within reference candidate tolerance what)
  execute_process(COMMAND ${COMPARE} ${reference} ${candidate} ${tolerance}
                  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${what} is not within ${tolerance} of ${reference}:\n${out}${err}")
  endif()
  string(REGEX MATCH "hidden_states[^\n]*" line "${out}")
  message(STATUS "${what}: ${line}")
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

# Values: every fixture model, outputs to 1e-5 and gradients to 1e-4 of the reference's
# scale (float32 against PyTorch's float32 autograd), top-k indices exactly. The
# transformers 5.x fixtures (hf5/) run from both checkpoint layouts; the gradients must come
# back under the names of the layout read (grads.safetensors per expert, grads_fused
# fused).
function(check_model name dir model grads_reference)
  expect_exit(0 --model ${dir}/${model} --layer 1 --input ${dir}/input.safetensors
              --output ${WORK}/${name}_output.safetensors
              --grad-output ${dir}/grad_output.safetensors --grads ${WORK}/${name}_grads.safetensors)
  foreach(pair "output.safetensors;output;1e-5" "${grads_reference};grads;1e-4")
    list(GET pair 0 reference)
    list(GET pair 1 kind)
    list(GET pair 2 tolerance)
    expect_within(${dir}/${reference} ${WORK}/${name}_${kind}.safetensors ${tolerance}
                  "kmoe-run ${name} ${kind}")
  endforeach()
endfunction()
foreach(model mixtral deepseek_v3 qwen3_moe)
  check_model(${model} ${FIXTURES}/${model} model grads.safetensors)
endforeach()
file(GLOB hf5_families LIST_DIRECTORIES true RELATIVE ${FIXTURES}/hf5 ${FIXTURES}/hf5/*)
list(LENGTH hf5_families count)
if(count LESS 8)
  message(FATAL_ERROR "expected the transformers 5.x fixtures in ${FIXTURES}/hf5, found ${count}")
endif()
foreach(family ${hf5_families})
  set(dir ${FIXTURES}/hf5/${family})
  check_model(hf5_${family} ${dir} model grads.safetensors)
  if(EXISTS ${dir}/model_fused)
    check_model(hf5_${family}_fused ${dir} model_fused grads_fused.safetensors)
  endif()
endforeach()

# Weight-only experts: --dtype int8 on every family with GLU experts, outputs within 2% of
# the reference's scale (INT8 per output channel; the float router keeps top-k exact), and
# bf16 / fp16 on the 4.x fixtures and a shared-expert family within 1%; the errors are
# printed for docs/precision.md. GPT-OSS's clamped experts and training are refused.
function(check_weight_only dtype tolerance name dir)
  expect_exit(0 --model ${dir}/model --layer 1 --input ${dir}/input.safetensors
              --output ${WORK}/${name}_${dtype}.safetensors --dtype ${dtype})
  # The output's hidden states are in the storage dtype (int8: F32, its activations').
  set(stored "F32")
  if(dtype STREQUAL "bf16")
    set(stored "BF16")
  elseif(dtype STREQUAL "fp16")
    set(stored "F16")
  endif()
  file(READ ${WORK}/${name}_${dtype}.safetensors header OFFSET 8 LIMIT 1024)
  if(NOT header MATCHES "\"hidden_states\":{\"dtype\":\"${stored}\"")
    message(FATAL_ERROR "kmoe-run --dtype ${dtype} ${name}: hidden_states not written as "
                        "${stored}:\n${header}")
  endif()
  expect_within(${dir}/output.safetensors ${WORK}/${name}_${dtype}.safetensors ${tolerance}
                "kmoe-run --dtype ${dtype} ${name}")
endfunction()
foreach(model mixtral deepseek_v3 qwen3_moe)
  foreach(pair "int8;0.02" "bf16;0.01" "fp16;0.01")
    list(GET pair 0 dtype)
    list(GET pair 1 tolerance)
    check_weight_only(${dtype} ${tolerance} ${model} ${FIXTURES}/${model})
  endforeach()
endforeach()
check_weight_only(bf16 0.01 hf5_qwen2_moe ${FIXTURES}/hf5/qwen2_moe)
foreach(family ${hf5_families})
  if(NOT family STREQUAL "gpt_oss")
    check_weight_only(int8 0.02 hf5_${family} ${FIXTURES}/hf5/${family})
  endif()
endforeach()
expect_exit(1 --model ${FIXTURES}/hf5/gpt_oss/model --layer 1
            --input ${FIXTURES}/hf5/gpt_oss/input.safetensors --output ${WORK}/gpt_oss_int8.safetensors
            --dtype int8)
if(NOT last_err MATCHES "clamped SwiGLU experts")
  message(FATAL_ERROR "--dtype int8 on GPT-OSS did not name the expert kind:\n${last_err}")
endif()
expect_exit(2 --model ${FIXTURE}/model --layer 1 --input ${FIXTURE}/input.safetensors
            --output ${WORK}/y.safetensors --dtype bf16 --grad-output ${FIXTURE}/grad_output.safetensors
            --grads ${WORK}/g.safetensors)
expect_exit(2 --model ${FIXTURE}/model --layer 1 --input ${FIXTURE}/input.safetensors
            --output ${WORK}/y.safetensors --dtype f8)
expect_exit(2 --model ${FIXTURE}/model --layer 1 --input ${FIXTURE}/input.safetensors
            --output ${WORK}/y.safetensors --output-dtype f8)
# bf16 expert weights with the output kept in F32: the fixture's own values (the weights are
# bf16 in the checkpoint), to the order of the sums.
expect_exit(0 --model ${FIXTURE}/model --layer 1 --input ${FIXTURE}/input.safetensors
            --output ${WORK}/bf16_f32.safetensors --dtype bf16 --output-dtype f32)
expect_within(${FIXTURE}/output.safetensors ${WORK}/bf16_f32.safetensors 1e-5
              "--dtype bf16 --output-dtype f32")
# Against transformers running the block in bf16 (tests/fixtures/README.md, "bf16 outputs"):
# within 1% of the output's scale; transformers' own bf16 output is 0.35-0.77% from its
# float32 output, so this bounds the rounding of a bf16 computation, not exactness.
foreach(family mixtral deepseek_v3 qwen3_moe)
  set(dir ${FIXTURES}/hf5/${family})
  expect_exit(0 --model ${dir}/model --layer 1 --input ${dir}/input.safetensors
              --output ${WORK}/hf5_${family}_bf16.safetensors --dtype bf16)
  expect_within(${dir}/output_bf16.safetensors ${WORK}/hf5_${family}_bf16.safetensors 0.01
                "--dtype bf16 ${family} against transformers' bf16")
endforeach()

# The whole block in 16 bits (--activations bf16 / fp16: weights, router weight and
# activations stored in 16 bits, read straight from the checkpoint, accumulation in float).
# Against transformers running the same blocks in bf16, both checkpoint layouts: within 1% of
# the output's scale, the weight-only path's bound. Both sides store every activation in bf16
# but round at different points (transformers also its logits and the routing weights), so
# they differ by a few bf16 units of the output: one unit is 2^-8 to 2^-7 of the scale
# (0.39-0.78%); measured 0.38% (Mixtral), 0.75% (DeepSeek-V3), 0.90% (Qwen3-MoE), where
# transformers' own bf16 output is 0.35-0.77% from its float32 output.
foreach(family mixtral deepseek_v3 qwen3_moe)
  set(dir ${FIXTURES}/hf5/${family})
  foreach(model model model_fused)
    set(out ${WORK}/hf5_${family}_${model}_bf16_block.safetensors)
    expect_exit(0 --model ${dir}/${model} --layer 1 --input ${dir}/input.safetensors
                --output ${out} --dtype bf16 --activations bf16)
    if(NOT last_out MATCHES "bf16 weights and activations")
      message(FATAL_ERROR "--activations bf16 ${family} did not run the 16-bit block:\n${last_out}")
    endif()
    file(READ ${out} header OFFSET 8 LIMIT 1024)
    if(NOT header MATCHES "\"hidden_states\":{\"dtype\":\"BF16\"")
      message(FATAL_ERROR "--activations bf16 ${family}: hidden_states not BF16:\n${header}")
    endif()
    expect_within(${dir}/output_bf16.safetensors ${out} 0.01
                  "--activations bf16 ${family} ${model} against transformers' bf16")
  endforeach()
  # fp16 holds the bf16 weights exactly and rounds activations by u = 2^-11 (0.05%): against
  # transformers' float32 output within 0.5% (10 u: a few roundings on each path plus the
  # order of the sums), top-k exact; measured 0.045%, 0.046%, 0.083%.
  set(out ${WORK}/hf5_${family}_fp16_block.safetensors)
  expect_exit(0 --model ${dir}/model --layer 1 --input ${dir}/input.safetensors --output ${out}
              --dtype fp16 --activations fp16)
  expect_within(${dir}/output.safetensors ${out} 0.005
                "--activations fp16 ${family} against transformers' float32")
endforeach()
# --output-dtype f32 widens the bf16 output exactly: equal to the BF16 file's values.
set(dir ${FIXTURES}/hf5/mixtral)
expect_exit(0 --model ${dir}/model --layer 1 --input ${dir}/input.safetensors
            --output ${WORK}/bf16_block_f32.safetensors --dtype bf16 --activations bf16
            --output-dtype f32)
file(READ ${WORK}/bf16_block_f32.safetensors header OFFSET 8 LIMIT 1024)
if(NOT header MATCHES "\"hidden_states\":{\"dtype\":\"F32\"")
  message(FATAL_ERROR "--output-dtype f32: hidden_states not F32:\n${header}")
endif()
expect_within(${WORK}/hf5_mixtral_model_bf16_block.safetensors ${WORK}/bf16_block_f32.safetensors 0
              "--output-dtype f32 of the BF16 output")
# Combinations that do not exist: a usage error (exit 2) naming the flag and the value.
set(run_args --model ${dir}/model --layer 1 --input ${dir}/input.safetensors
             --output ${WORK}/y.safetensors)
foreach(case "--activations;f8;--activations must be f32, bf16 or fp16, got 'f8'"
             "--activations;bf16;--activations bf16 needs --dtype bf16"
             "--dtype;fp16;--activations bf16 needs --dtype bf16 .*got --dtype fp16"
             "--dtype;f64;--activations f32 does not go with --dtype f64")
  list(GET case 0 flag)
  list(GET case 1 value)
  list(GET case 2 expected)
  if(flag STREQUAL "--dtype")
    if(value STREQUAL "f64")
      expect_exit(2 ${run_args} --activations f32 --dtype f64)
    else()
      expect_exit(2 ${run_args} --activations bf16 --dtype ${value})
    endif()
  else()
    expect_exit(2 ${run_args} ${flag} ${value})
  endif()
  if(NOT last_err MATCHES "${expected}")
    message(FATAL_ERROR "expected '${expected}' in:\n${last_err}")
  endif()
endforeach()
expect_exit(2 ${run_args} --dtype bf16 --activations bf16
            --grad-output ${dir}/grad_output.safetensors --grads ${WORK}/g.safetensors)
if(NOT last_err MATCHES "--activations bf16 is inference only")
  message(FATAL_ERROR "training a 16-bit block not refused by name:\n${last_err}")
endif()
expect_exit(2 ${run_args} --dtype bf16 --activations bf16 --max-resident-experts 2)
if(NOT last_err MATCHES "--activations bf16 loads every expert")
  message(FATAL_ERROR "a residency budget with a 16-bit block not refused:\n${last_err}")
endif()
# GPT-OSS's clamped SwiGLU experts in 16 bits (no bf16 output of transformers for it):
# against transformers' float32 output, bf16 within 2% (5 u, u = 2^-8: a few roundings on
# each path), fp16 within 0.5% as above, top-k exact; measured 0.52% and 0.048%.
foreach(pair "bf16;0.02" "fp16;0.005")
  list(GET pair 0 half)
  list(GET pair 1 tolerance)
  expect_exit(0 --model ${FIXTURES}/hf5/gpt_oss/model --layer 1
              --input ${FIXTURES}/hf5/gpt_oss/input.safetensors
              --output ${WORK}/gpt_oss_${half}_block.safetensors --dtype ${half} --activations ${half})
  expect_within(${FIXTURES}/hf5/gpt_oss/output.safetensors ${WORK}/gpt_oss_${half}_block.safetensors
                ${tolerance} "--activations ${half} gpt_oss against transformers' float32")
endforeach()
