"""What operators and supervisors see: health decisions and the health endpoint, metrics,
health-check pings, systemd notify/watchdog, the event-loop lag monitor.
"""
