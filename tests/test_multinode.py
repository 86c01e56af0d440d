"""Two simulated Ray nodes (ray.cluster_utils.Cluster): one rank per node generates the
same tokens as one node, and two replicas of an MP=2 gang land one per node, both get
work, and give what one replica gives."""

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
        # Two replicas of the same MP=2 gang, fractional CPUs: one gang per node.
        many = PROMPTS * 4
        with LLM(tiny_ckpt, replicas=2, cpus_per_rank=0.5, max_seq_len=64) as llm:
            replicated = llm.generate(many, GREEDY)
            gang_nodes = [{i["node_id"] for i in e.rank_info} for e in llm.router.engines]
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert [o.token_ids for o in spread] == [o.token_ids for o in packed]
    assert [o.token_ids for o in replicated] == [o.token_ids for o in packed] * 4
    assert {o.replica for o in replicated} == {0, 1}  # both gangs got work
    assert all(len(nodes) == 1 for nodes in gang_nodes)  # each gang packed on a node
    assert gang_nodes[0] != gang_nodes[1]  # and the gangs spread over the nodes
    for a, b in zip(spread, packed, strict=True):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
