import pytest

from birkhoff.errors import RecipeError
from birkhoff.launch.config import LaunchConfig
from birkhoff.launch.spawn import elastic_config
from birkhoff.launch.topology import first_host, resolve_topology

SLURM = {
    "SLURM_JOB_ID": "4242",
    "SLURM_NNODES": "4",
    "SLURM_NODEID": "2",
    "SLURM_JOB_NODELIST": "gpu[007-010]",
}


@pytest.mark.parametrize(
    ("nodelist", "host"),
    [
        ("node1", "node1"),
        ("gpu[007-010]", "gpu007"),
        ("gpu[3,5-6],cpu1", "gpu3"),
        ("a-b-[12-13]", "a-b-12"),
        ("login,compute[1-2]", "login"),
        ("rack1-[01-02]-ib,rack2-[01-02]-ib", "rack1-01-ib"),
    ],
)
def test_first_host_of_a_slurm_nodelist(nodelist, host):
    assert first_host(nodelist) == host


def test_single_node_defaults_outside_slurm():
    topo = resolve_topology(LaunchConfig(nproc_per_node=2), env={})
    assert (topo.nnodes, topo.node_rank, topo.world_size, topo.rdzv_endpoint) == (1, 0, 2, None)


def test_slurm_environment_fills_what_the_recipe_leaves_null():
    topo = resolve_topology(LaunchConfig(nproc_per_node=8), env=SLURM)
    assert (topo.nnodes, topo.node_rank, topo.world_size) == (4, 2, 32)
    assert topo.rdzv_endpoint == "gpu007:29500"
    assert topo.rdzv_id == "4242"


def test_recipe_values_win_over_slurm():
    cfg = LaunchConfig(
        nproc_per_node=8, nnodes=2, node_rank=1, rdzv_endpoint="head:1234", rdzv_id="myrun"
    )
    topo = resolve_topology(cfg, env=SLURM)
    assert (topo.nnodes, topo.node_rank, topo.rdzv_endpoint, topo.rdzv_id) == (
        2,
        1,
        "head:1234",
        "myrun",
    )


def test_multi_node_without_endpoint_outside_slurm_is_refused():
    with pytest.raises(RecipeError, match=r"launch\.rdzv_endpoint"):
        resolve_topology(LaunchConfig(nnodes=2, node_rank=0), env={})


def test_elastic_config_matches_torchrun_semantics():
    single = elastic_config(resolve_topology(LaunchConfig(nproc_per_node=2), env={}))
    assert (single.min_nodes, single.max_nodes, single.nproc_per_node) == (1, 1, 2)
    assert single.rdzv_endpoint == "localhost:0" and single.rdzv_backend == "c10d"
    multi = elastic_config(resolve_topology(LaunchConfig(nproc_per_node=8), env=SLURM))
    assert (multi.min_nodes, multi.max_nodes, multi.max_restarts) == (4, 4, 0)
    assert multi.rdzv_endpoint == "gpu007:29500" and multi.run_id == "4242"
    assert multi.rdzv_configs["is_host"] is False
    assert multi.shutdown_timeout == 120  # launch.stop_timeout_s: time to checkpoint on SIGTERM
