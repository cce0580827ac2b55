-- ARGV: prefix, room, user, connection. Returns the edge's version, or '' when none crossed.
return leave_room(ARGV[2], ARGV[3], ARGV[4]) or ''
