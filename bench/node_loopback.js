// Preloaded by bench/run.py with `node --require` when it runs the Node original relay.
// The original calls server.listen(PORT) with no host, which binds every interface;
// the benchmark must listen on 127.0.0.1 only, so a listen() given a port and no host
// gets host 127.0.0.1. Nothing else changes. run.py checks the listening address in
// /proc/net/tcp* afterwards and refuses to measure a server bound elsewhere.
'use strict';
const net = require('net');

const listen = net.Server.prototype.listen;
const isPort = (v) => typeof v === 'number' || (typeof v === 'string' && /^\d+$/.test(v));

net.Server.prototype.listen = function (...args) {
  if (isPort(args[0]) && typeof args[1] !== 'string') {
    args.splice(1, 0, '127.0.0.1');
  } else if (args[0] && typeof args[0] === 'object' && !args[0].host && !args[0].path && !args[0].fd
             && !args[0]._handle && isPort(args[0].port)) {
    args[0] = { ...args[0], host: '127.0.0.1' };
  }
  return listen.apply(this, args);
};
