-- ARGV: prefix, room, user, connection. Returns the edge ('version count'), or '' when none crossed.
return leave_room(ARGV[2], ARGV[3], ARGV[4]) or ''
