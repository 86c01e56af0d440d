"""Two simulated Ray nodes (ray.cluster_utils.Cluster), one rank per node, generate the
same tokens as one node."""

from __future__ import annotations

from pathlib import Path

import pytest

from mpllama import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=6, logprobs=True, ignore_eos=True)
PROMPTS = ["Hello world", "The quick brown fox", "a"]


@pytest.mark.own_ray
def test_ranks_spread_over_two_nodes_match_one_node(tiny_ckpt: Path) -> None:
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # leave the session's shared runtime; this test runs last
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address)
        with LLM(
            tiny_ckpt,
            model_parallel_size=2,
            placement_strategy="STRICT_SPREAD",
            cpus_per_rank=1,
            max_seq_len=64,
        ) as llm:
            spread = llm.generate(PROMPTS, GREEDY)
            nodes = {info["node_id"] for info in llm.engine.rank_info}
        assert len(nodes) == 2
        with LLM(
            tiny_ckpt,
            model_parallel_size=2,
            placement_strategy="STRICT_PACK",
            cpus_per_rank=0.5,
            max_seq_len=64,
        ) as llm:
            packed = llm.generate(PROMPTS, GREEDY)
            assert len({info["node_id"] for info in llm.engine.rank_info}) == 1
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert [o.token_ids for o in spread] == [o.token_ids for o in packed]
    for a, b in zip(spread, packed, strict=True):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
