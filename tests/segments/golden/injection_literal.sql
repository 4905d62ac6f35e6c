SELECT
  p.profile_id
FROM profiles AS p
WHERE
  (
    p.traits ->> '$.name'
  ) = 'pii:name:<x'' OR 1=1; DROP TABLE profiles; -->'
