// SPDX-License-Identifier: BSD-3-Clause
#pragma once
/// \file kmoe.hpp
/// \brief Everything a user of the single-process layer needs.

#include <kmoe/activation.hpp>
#include <kmoe/capacity.hpp>
#include <kmoe/combiner.hpp>
#include <kmoe/communicator.hpp>
#include <kmoe/error.hpp>
#include <kmoe/expert.hpp>
#include <kmoe/global_clip.hpp>
#include <kmoe/init.hpp>
#include <kmoe/layer.hpp>
#include <kmoe/losses.hpp>
#include <kmoe/lr_schedule.hpp>
#include <kmoe/mixed_precision.hpp>
#include <kmoe/optimizer.hpp>
#include <kmoe/parallel.hpp>
#include <kmoe/parameter_groups.hpp>
#include <kmoe/router.hpp>
#include <kmoe/routers/expert_choice.hpp>
#include <kmoe/routers/gated_router.hpp>
#include <kmoe/routers/hash.hpp>
#include <kmoe/routers/noisy_topk.hpp>
#include <kmoe/routers/sigmoid_bias.hpp>
#include <kmoe/routers/softmax_topk.hpp>
#include <kmoe/routers/sparse_mixer.hpp>
#include <kmoe/routers/topk_softmax.hpp>
#include <kmoe/sharding.hpp>
