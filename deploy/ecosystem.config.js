// PM2 example for teams coming from the Node daemon (see docs/operations.md, "PM2").
//
//   set -a; . /etc/trio-idle/env; set +a      # secrets stay out of this file
//   pm2 start deploy/ecosystem.config.js && pm2 save
//
// PM2 passes its own environment to the process, so export the variables (as above)
// in the shell that runs `pm2 start`, or list non-secret settings under `env` below.
// trio-idle is a Python program: `interpreter: 'none'` runs the script directly.
module.exports = {
  apps: [
    {
      name: 'trio-idle',
      script: '/usr/local/bin/trio-idle',
      args: 'serve',
      interpreter: 'none',
      exec_mode: 'fork', // one process: sessions are not shared between instances
      instances: 1,
      autorestart: true,
      // SIGTERM, then SIGKILL after kill_timeout: LOGOUTs take up to
      // TRIO_IDLE_SHUTDOWN_TIMEOUT (5 s); leave room
      kill_signal: 'SIGTERM',
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
      time: false, // trio-idle timestamps its own lines
      env: {
        PYTHONUNBUFFERED: '1',
        TRIO_IDLE_HEALTH_ADDR: '127.0.0.1:9310',
        TRIO_IDLE_LOG_FORMAT: 'text'
      }
    }
  ]
}
