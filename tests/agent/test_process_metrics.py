"""An agent run as its own process (`p2psched agent`) also reports the process:
CPU, resident memory, open files and the garbage collector, beside its own figures."""

from prometheus_client.parser import text_string_to_metric_families

from agents import new_agent


def test_an_agent_process_reports_its_cpu_memory_and_collections(tmp_path):
    agent = new_agent(tmp_path, "solo").start()
    try:
        with agent.client() as http:
            families = {f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)}
    finally:
        assert agent.stop() == 0
    rss = families["process_resident_memory_bytes"].samples[0].value
    assert 10e6 < rss < 1e9
    assert families["process_cpu_seconds"].samples[0].value > 0
    assert families["process_open_fds"].samples[0].value > 3
    collections = {s.labels["generation"]: s.value for s in families["python_gc_collections"].samples}
    assert set(collections) == {"0", "1", "2"} and collections["2"] >= 1  # start-up's full collection
    assert families["python_info"].samples[0].labels["implementation"] == "CPython"
    assert "p2psched_queue_length" in families  # the agent's own, in the same registry
