//! Payloads and arrays pass between the caller and SPI as the datums PostgreSQL already holds: never
//! through text or serde (`pgrx::JsonB` would print and re-parse every payload).
use std::ptr::NonNull;

use pgrx::array::RawArray;
use pgrx::callconv::{Arg, ArgAbi, BoxRet, FcInfo};
use pgrx::datum::Datum;
use pgrx::{pg_sys, FromDatum, IntoDatum, PgMemoryContexts};

macro_rules! raw_varlena {
    ($(#[$doc:meta])* $name:ident, $oid:expr, $sql:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug)]
        pub struct $name(pg_sys::Datum);

        impl FromDatum for $name {
            unsafe fn from_polymorphic_datum(
                datum: pg_sys::Datum,
                is_null: bool,
                _: pg_sys::Oid,
            ) -> Option<Self> {
                (!is_null).then_some(Self(datum))
            }

            // SPI frees its tuples at SPI_finish: copy what we keep into the caller's context.
            unsafe fn from_datum_in_memory_context(
                mut memory_context: PgMemoryContexts,
                datum: pg_sys::Datum,
                is_null: bool,
                _: pg_sys::Oid,
            ) -> Option<Self> {
                if is_null {
                    return None;
                }
                // SAFETY: the caller hands a valid varlena datum of this type and a live context; the
                // copy is made in that context, so it outlives SPI's tuple memory.
                unsafe {
                    memory_context.switch_to(|_| {
                        Some(Self(pg_sys::Datum::from(pg_sys::pg_detoast_datum_copy(datum.cast_mut_ptr()))))
                    })
                }
            }
        }

        impl IntoDatum for $name {
            fn into_datum(self) -> Option<pg_sys::Datum> {
                Some(self.0)
            }

            fn type_oid() -> pg_sys::Oid {
                $oid
            }
        }

        // SAFETY: the value is the argument's datum itself, valid for the call, as ArgAbi requires.
        unsafe impl<'fcx> ArgAbi<'fcx> for $name {
            unsafe fn unbox_arg_unchecked(arg: Arg<'_, 'fcx>) -> Self {
                let index = arg.index();
                // SAFETY: pgrx calls this with the argument of a function declared to take this type.
                unsafe {
                    arg.unbox_arg_using_from_datum()
                        .unwrap_or_else(|| panic!("argument {index} must not be null"))
                }
            }
        }

        // SAFETY: the datum returned is a valid value of the declared SQL type.
        unsafe impl BoxRet for $name {
            unsafe fn box_into<'fcx>(self, fcinfo: &mut FcInfo<'fcx>) -> Datum<'fcx> {
                // SAFETY: self.0 is a datum of this type, alive for at least the current call.
                unsafe { fcinfo.return_raw_datum(self.0) }
            }
        }

        pgrx::impl_sql_translatable!($name, $sql);
    };
}

raw_varlena!(
    /// A `jsonb` value, untouched.
    Jsonb, pg_sys::JSONBOID, "jsonb"
);
raw_varlena!(
    /// A `jsonb[]` value, untouched.
    JsonbArray, pg_sys::JSONBARRAYOID, "jsonb[]"
);
raw_varlena!(
    /// A `bigint[]` value, untouched.
    BigintArray, pg_sys::INT8ARRAYOID, "bigint[]"
);
raw_varlena!(
    /// A `uuid[]` value, untouched.
    UuidArray, pg_sys::UUIDARRAYOID, "uuid[]"
);

impl Jsonb {
    /// Whether the top-level value is an object, read from the jsonb container header.
    pub fn is_object(&self) -> bool {
        // SAFETY: self.0 is a jsonb datum; detoasted, it starts with the varlena header and then the
        // root container's header, which may sit unaligned.
        unsafe {
            let detoasted = pg_sys::pg_detoast_datum(self.0.cast_mut_ptr());
            let header = detoasted
                .cast::<u8>()
                .add(pg_sys::VARHDRSZ)
                .cast::<u32>()
                .read_unaligned();
            header & pg_sys::JB_FOBJECT != 0
        }
    }

    /// Size of the value as stored uncompressed, which is what max_message_size limits.
    pub fn size(&self) -> usize {
        // SAFETY: self.0 is a valid varlena datum.
        unsafe { pg_sys::toast_raw_datum_size(self.0) }
    }
}

/// Length of a one-dimensional array and whether any element is NULL.
pub trait ArrayShape: IntoDatum + Copy {
    fn shape(self) -> (usize, bool) {
        let datum = self.into_datum().expect("array datum");
        // SAFETY: the datum is an array of this type; detoasted, it is a valid ArrayType.
        unsafe {
            let detoasted = pg_sys::pg_detoast_datum(datum.cast_mut_ptr());
            let array = RawArray::from_ptr(NonNull::new(detoasted.cast()).expect("array pointer"));
            (array.len(), array.any_nulls())
        }
    }
}

impl ArrayShape for JsonbArray {}
impl ArrayShape for BigintArray {}
impl ArrayShape for UuidArray {}

impl JsonbArray {
    /// The elements, as datums that live as long as the array; the caller has ruled out NULLs.
    pub fn elements(&self) -> Vec<Jsonb> {
        // SAFETY: self.0 is a jsonb[] datum; deconstruct_array fills `count` elements (palloc'd in
        // the current context, as long-lived as the array) for the element type given.
        unsafe {
            let array = pg_sys::pg_detoast_datum(self.0.cast_mut_ptr()).cast::<pg_sys::ArrayType>();
            let mut elements = std::ptr::null_mut();
            let mut nulls = std::ptr::null_mut();
            let mut count = 0;
            pg_sys::deconstruct_array(
                array,
                pg_sys::JSONBOID,
                -1,
                false,
                pg_sys::TYPALIGN_INT as std::ffi::c_char,
                &mut elements,
                &mut nulls,
                &mut count,
            );
            std::slice::from_raw_parts(elements, count as usize)
                .iter()
                .map(|&element| Jsonb(element))
                .collect()
        }
    }
}
