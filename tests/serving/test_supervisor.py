"""The restart policy of `adapterd serve` (server.supervisor) on a fake clock with fake processes."""

import json

from server.supervisor import RestartPolicy, Supervisor, read_status


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Proc:
    def __init__(self):
        self.code = None

    def poll(self):
        return self.code


def test_backoff_doubles_and_a_process_restarted_five_times_in_a_minute_stays_down(tmp_path):
    clock, said, started = Clock(), [], []

    def start():
        started.append(Proc())
        return started[-1]

    sup = Supervisor(RestartPolicy(), said.append, tmp_path / "supervisor.json", clock)
    other = Proc()
    sup.watch("worker-0", start(), start)
    sup.watch("worker-1", other, lambda: Proc())
    delays = []
    for _ in range(5):
        sup.process("worker-0").code = -9
        sup.tick()
        due = sup.children["worker-0"].restart_at
        delays.append(due - clock.now)
        clock.now = due - 0.01
        sup.tick()
        assert len(started) == len(delays)  # not before its time
        clock.now = due
        sup.tick()
        assert len(started) == len(delays) + 1 and sup.process("worker-0") is started[-1]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0]
    sup.process("worker-0").code = -9
    sup.tick()
    clock.now += 100
    sup.tick()
    assert len(started) == 6  # given up: no sixth restart
    assert "worker-0" in sup.given_up() and "5 restarts within 60 s" in sup.given_up()["worker-0"]
    assert any("not restarting it again" in line for line in said)
    assert read_status(tmp_path)["given_up"] == sup.given_up()
    assert sup.process("worker-1") is other and "worker-1" not in sup.given_up()  # the rest untouched


def test_restarts_spread_over_time_keep_going_and_the_delay_is_capped(tmp_path):
    clock = Clock()
    policy = RestartPolicy(first_delay_s=4, max_delay_s=30, window_s=60, max_restarts=5)
    sup = Supervisor(policy, lambda _: None, tmp_path / "s.json", clock)
    sup.watch("valkey", Proc(), Proc)
    for _ in range(12):  # one death every 61 s: never 5 within a minute
        sup.process("valkey").code = 1
        sup.tick()
        clock.now = sup.children["valkey"].restart_at
        sup.tick()
        clock.now += 61
    assert sup.given_up() == {}
    assert policy.delay(0) == 4 and policy.delay(3) == 30 and policy.delay(10) == 30


def test_a_start_that_raises_counts_as_an_exit(tmp_path):
    clock, said = Clock(), []

    def start():
        raise OSError("port in use")

    sup = Supervisor(RestartPolicy(max_restarts=2), said.append, tmp_path / "s.json", clock)
    p = Proc()
    sup.watch("gateway", p, start)
    p.code = 1
    for _ in range(10):
        sup.tick()
        clock.now += 1
    assert "gateway" in sup.given_up()
    assert any("could not be restarted: port in use" in line for line in said)
    assert json.loads((tmp_path / "s.json").read_text())["restarts"] == {"gateway": 2}
