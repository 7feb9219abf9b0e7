"""ClusterView's holds: what an offer in flight takes from a peer's vector.

The membership service is replaced by a table of members here: the view is an
adapter over what the service returns (tests/agent/test_peer_vectors.py runs it over
real gossip)."""

from types import SimpleNamespace

from p2psched.agent.cluster import ClusterView
from p2psched.resources import NodeState, ResourceVector


def view_of(vector: ResourceVector) -> ClusterView:
    peer = SimpleNamespace(node_id="p", state="alive", node_state=NodeState("p", vector=vector))
    service = SimpleNamespace(members=lambda: [peer], member_count=lambda: 2)
    return ClusterView(service, "me", clock=lambda: 0.0)


def peer_vector(view: ClusterView) -> ResourceVector:
    (state,) = view.alive_states()
    return state.vector


def test_holds_take_cpu_memory_and_gpu_slots_until_released():
    view = view_of(ResourceVector(cpu_total=8, cpu_free=8, mem_total_mb=4096, mem_free_mb=4096,
                                  gpu_free={"whole": 2, "1g.10gb": 7}, gpu_total={"whole": 2, "1g.10gb": 7}))
    view.hold("p", "j1", 2.0, 1024)
    view.hold("p", "j2", 1.0, 512, gpu=1, gpu_type="whole")
    view.hold("p", "j3", 1.0, 256, gpu=2)  # any type: the best fit that holds it ("whole" has 1 left)
    view.hold("p", "j4", 1.0, 256, gpu=3)  # again the 1g type
    v = peer_vector(view)
    assert (v.cpu_free, v.mem_free_mb, v.running) == (3.0, 2048, 4)
    assert v.gpu_free == {"whole": 1, "1g.10gb": 2}
    view.hold("p", "j5", 9.0, 9999)  # more than is free: nothing goes below zero
    assert (peer_vector(view).cpu_free, peer_vector(view).mem_free_mb) == (0.0, 0)
    for job in ("j1", "j2", "j3", "j4", "j5"):
        view.release(job)
    assert peer_vector(view).cpu_free == 8 and peer_vector(view).gpu_free == {"whole": 2, "1g.10gb": 7}
    assert view.holding() == 0


def test_a_job_is_held_on_one_peer_at_a_time():
    view = view_of(ResourceVector(cpu_total=2, cpu_free=2, mem_total_mb=1024, mem_free_mb=1024))
    view.hold("q", "j1", 2.0, 100)  # offered to q first (q is not alive here: it takes nothing from p)
    assert peer_vector(view).cpu_free == 2
    view.hold("p", "j1", 2.0, 100)  # q refused: now offered to p
    assert peer_vector(view).cpu_free == 0 and view.holding() == 1
    view.release("j1")
    view.release("j1")  # a second release is harmless
    assert peer_vector(view).cpu_free == 2
