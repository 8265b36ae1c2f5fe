-- Every later script runs in this database, with the extension created once.
CREATE EXTENSION bussig;
SELECT extname, extversion IS NOT NULL AS has_version, extrelocatable FROM pg_extension WHERE extname = 'bussig';
-- Everything lives in schema bussig.
SELECT count(*) > 0 AS has_functions FROM pg_proc WHERE pronamespace = 'bussig'::regnamespace;
-- The later scripts show how a statement ends: 'ok', or its SQLSTATE and message.
CREATE FUNCTION outcome_of(statement text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE statement;
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || SQLERRM;
END $$;
