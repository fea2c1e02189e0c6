// PM2 example for teams coming from the Node daemon (see docs/operations.md, "Run under PM2").
//
//   pm2 start deploy/ecosystem.config.js && pm2 save
//   pm2 startup                                # once: start PM2 (and trio-idle) at boot
//   pm2 install pm2-logrotate                  # once: rotate ~/.pm2/logs
//
// The settings and secrets come from /etc/trio-idle/env, the same file systemd reads,
// read with systemd's rules by `--env-file` (never `. /etc/trio-idle/env` in a shell:
// that expands `$` and breaks on `&` in secrets). The file's values win over `env` below.
// trio-idle is a Python program: `interpreter: 'none'` runs the script directly.
module.exports = {
  apps: [
    {
      name: 'trio-idle',
      script: '/usr/local/bin/trio-idle',
      args: 'serve --env-file /etc/trio-idle/env',
      interpreter: 'none',
      exec_mode: 'fork', // one process: sessions are not shared between instances
      instances: 1,
      autorestart: true,
      // `pm2 stop` sends SIGINT (PM2 picks the signal itself: PM2_KILL_SIGNAL in the
      // environment of the PM2 daemon, not a setting of this file); trio-idle stops
      // gracefully on SIGINT as on SIGTERM. SIGKILL follows after kill_timeout: the
      // LOGOUTs take up to TRIO_IDLE_SHUTDOWN_TIMEOUT (5 s), closing 10,000 TLS
      // connections ≈ 3 s more, and the state store's last flush; 15 s leaves room.
      kill_timeout: 15000,
      // a crash loop backs off (100 ms, 150 ms, ... up to 15 s) instead of hammering IMAP
      exp_backoff_restart_delay: 100,
      max_restarts: 50,
      min_uptime: '30s',
      // memory guard: see docs/performance.md for the per-session figures
      max_memory_restart: '1G',
      // INFO lines go to stdout (out_file), warnings and errors to stderr (error_file),
      // like console.log / console.error; one combined file as well:
      //out_file: '/var/log/trio-idle/out.log',
      //error_file: '/var/log/trio-idle/error.log',
      //log_file: '/var/log/trio-idle/combined.log',
      merge_logs: true, // no instance-id suffix on the file names (one instance)
      time: false, // trio-idle timestamps its own lines (with their UTC offset)
      env: {
        PYTHONUNBUFFERED: '1',
        // the health port on the host's loopback (set in /etc/trio-idle/env to change it)
        TRIO_IDLE_HEALTH_ADDR: '127.0.0.1:9310'
      }
    }
  ]
}
