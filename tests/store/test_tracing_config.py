"""Where traces go: off unless an OTLP endpoint is configured (a flag, else the standard environment)."""

from adapters_store.tracing import traces_url


def test_off_without_an_endpoint():
    assert traces_url(None, env={}) is None
    assert traces_url("", env={"OTHER": "x"}) is None


def test_the_flag_wins_and_base_urls_get_the_traces_path():
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://env:4318/"}
    assert traces_url("http://flag:4318", env=env) == "http://flag:4318/v1/traces"
    assert traces_url(None, env=env) == "http://env:4318/v1/traces"
    both = env | {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:4318/custom"}
    assert traces_url(None, env=both) == "http://t:4318/custom"  # the signal-specific one is a full URL
