"""Brute-force defence per source IP, after SFTPGo's defender.

Every event adds to the IP's score within an observation window (a failed login
counts more than a success); at the threshold the IP is banned, and each later ban
lasts longer. Safelisted networks are never banned. Pure, with the clock passed in.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable
from enum import Enum

from purlgate.config import DefenderConfig

log = logging.getLogger("purlgate.defender")


class Event(Enum):
    VALID = "valid"
    INVALID = "invalid"
    NO_AUTH = "no-auth"


class Defender:
    def __init__(self, config: DefenderConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self._safe = [ipaddress.ip_network(n, strict=False) for n in config.safelist]
        self._events: dict[str, deque[tuple[float, int]]] = defaultdict(deque)
        self._banned_until: dict[str, float] = {}
        self._bans: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        self.events: Counter[str] = Counter()
        self.bans = 0

    def safe(self, ip: str) -> bool:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address in net for net in self._safe)

    def banned(self, ip: str) -> bool:
        if not self.config.enabled or self.safe(ip):
            return False
        with self._lock:
            until = self._banned_until.get(ip)
            if until is None:
                return False
            if until <= self.clock():
                del self._banned_until[ip]
                return False
            return True

    def record(self, ip: str, event: Event) -> bool:
        """Add an event; True if the IP is banned now."""
        self.events[event.value] += 1  # for the metrics: logins by outcome
        if event is Event.VALID or not self.config.enabled or self.safe(ip):
            # As SFTPGo scores: only failures count; a script logging in every minute
            # to poll Downloads must never be banned for it.
            return False
        c = self.config
        points = c.score_invalid if event is Event.INVALID else c.score_no_auth
        now = self.clock()
        with self._lock:
            events = self._events[ip]
            events.append((now, points))
            while events and events[0][0] <= now - c.observation_seconds:
                events.popleft()
            if sum(p for _, p in events) < c.threshold:
                return False
            duration = c.ban_seconds * c.ban_increase ** self._bans[ip]
            self._bans[ip] += 1
            self._banned_until[ip] = now + duration
            self.bans += 1
            events.clear()
        log.warning("banned %s for %.0f s after repeated login failures", ip, duration)
        return True
