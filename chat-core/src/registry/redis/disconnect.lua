-- ARGV: prefix, connection. Returns the edges crossed (see remove_connection).
local out = {}
remove_connection(ARGV[2], out)
return out
