"""Running relayd as a service: metrics, logs, systemd notifications, the start-up block and the activity line."""
