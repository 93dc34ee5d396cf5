-- Test script for the store adapter: echoes its key and argument with the server's clock.
return {KEYS[1], ARGV[1], redis.call('TIME')[1]}
